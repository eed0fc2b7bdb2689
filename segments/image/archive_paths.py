"""Member names from archives someone else wrote: image layers and guests' outputs.

Theory of operation
-------------------
A tar member's name is a claim by whoever wrote the archive: an image's author
or a guest. Before anything uses one it is normalised to a relative POSIX path
under the archive's root, or refused with ``UnsafePath``:

* an absolute name, a ``..`` component, a NUL, an empty name
  and a name that normalises to the root itself are refused;
* ``./`` prefixes, doubled slashes and single ``.`` components are dropped
  (``docker save`` and GNU tar write ``./etc/passwd``);
* a component over ``MAX_COMPONENT_BYTES`` or a path over ``MAX_PATH_BYTES``
  (UTF-8) or deeper than ``MAX_DEPTH`` is refused, since the guest's and the
  host's file systems would refuse it later, somewhere less clear.

The module is pure: it never touches a file system.
"""

from __future__ import annotations

SANS_IO = True

MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096
MAX_DEPTH = 64


class UnsafePath(ValueError):
    """An archive member's name that could leave its root, or that no file system takes."""


def names_the_root(name: str) -> bool:
    """True for ``.``, ``./`` and the like: the folder an archive was made from."""
    return (
        isinstance(name, str)
        and bool(name)
        and not name.startswith("/")
        and all(part in ("", ".") for part in name.split("/"))
    )


def safe_member_name(name: str) -> str:
    """`name` as a normalised relative path ("etc/passwd"), or raise UnsafePath."""
    if not isinstance(name, str) or not name:
        raise UnsafePath("an archive member has an empty name")
    if "\x00" in name:
        raise UnsafePath(f"archive member {name[:80]!r} has a NUL in its name")
    if name.startswith("/"):
        raise UnsafePath(f"archive member {name[:80]!r} has an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts:
        raise UnsafePath(f"archive member {name[:80]!r} names the root itself")
    if ".." in parts:
        raise UnsafePath(f"archive member {name[:80]!r} climbs out with '..'")
    if len(parts) > MAX_DEPTH:
        raise UnsafePath(f"archive member {name[:80]!r} is over {MAX_DEPTH} folders deep")
    for part in parts:
        if len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES:
            raise UnsafePath(f"archive member {name[:80]!r} has a name over 255 bytes")
    path = "/".join(parts)
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise UnsafePath(f"archive member {name[:80]!r} has a path over {MAX_PATH_BYTES} bytes")
    return path
