"""Image layers: check one as it streams past, and lay a stack of them out as one root.

Theory of operation
-------------------
A layer is a tar stream (OCI image spec, "Image Layer Filesystem Changeset")
written by whoever made the image. Gleaner never unpacks one on the host: a
layer is kept as the bytes it is, in content-addressed blocks, and only the
guest ever sees its files. What the host does is read each member's header,
once, at import, and refuse a layer that is not plainly a root file system:

* a name that is not a relative path under the root (``archive_paths``);
* a character or block device (the guest's /dev is the kernel's devtmpfs, so
  an image needs none), a GNU sparse or multi-volume member, or any type but
  file, folder, symbolic link, hard link and FIFO;
* a hard link whose target is not a safe name, a symbolic link target with a
  NUL or over ``MAX_LINK_BYTES``;
* more than ``LayerLimits.max_members`` members, a file over
  ``max_file_bytes`` or a layer over ``max_layer_bytes`` (header sizes are
  checked before the data is read);
* metadata headers big enough to stall the parser, and GNU sparse maps
  (``tarstream``).

Symbolic links may point anywhere, ``/`` included: they are resolved inside
the guest's root, never on the host.

``Changeset`` is what a checked layer says: its entries in order and its
whiteouts. ``.wh.NAME`` deletes NAME from the layers below; ``.wh..wh..opq``
in a folder hides everything the layers below put in it. ``flatten`` applies a
stack of changesets, lowest first, and returns the root the guest will see:
for every path, the layer and the entry that provide it. It is pure and
deterministic, so every host that holds the same layers lays out the same
root.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

from segments.image.archive_paths import UnsafePath, names_the_root, safe_member_name
from segments.image.errors import ImageError
from segments.image.tarstream import ArchiveRefused, member_type, open_stream

SANS_IO = True

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
MAX_LINK_BYTES = 4096
CONTROL = re.compile(r"[\x00-\x1f\x7f]")

KIND_FILE, KIND_DIR, KIND_SYMLINK, KIND_HARDLINK, KIND_FIFO = (
    "file",
    "dir",
    "symlink",
    "hardlink",
    "fifo",
)
_KINDS = {
    tarfile.REGTYPE: KIND_FILE,
    tarfile.AREGTYPE: KIND_FILE,
    tarfile.DIRTYPE: KIND_DIR,
    tarfile.SYMTYPE: KIND_SYMLINK,
    tarfile.LNKTYPE: KIND_HARDLINK,
    tarfile.FIFOTYPE: KIND_FIFO,
}


class LayerError(ImageError):
    """A layer is refused; the message names the member and why."""


@dataclass(frozen=True, slots=True)
class LayerLimits:
    max_members: int = 1_000_000
    max_file_bytes: int = 16 << 30
    max_layer_bytes: int = 32 << 30
    max_image_members: int = 2_000_000  # over all layers (``flatten``)
    max_image_bytes: int = 64 << 30  # over all layers (the library, as it stores them)


@dataclass(frozen=True, slots=True)
class Entry:
    """One member of a layer, as the guest will see it."""

    path: str
    kind: str
    size: int = 0
    mode: int = 0o644
    link: str = ""


@dataclass(slots=True)
class Changeset:
    """A checked layer: its entries, the paths it deletes, the folders it makes opaque."""

    entries: list[Entry] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    opaque: list[str] = field(default_factory=list)
    content_bytes: int = 0


def check_layer(stream: IO[bytes], limits: LayerLimits = LayerLimits()) -> Changeset:
    """Read a layer's tar stream through to its end; its changeset, or raise LayerError."""
    changes = Changeset()
    try:
        with open_stream(stream) as archive:
            for count, info in enumerate(archive, start=1):
                if count > limits.max_members:
                    raise LayerError(f"layer has over {limits.max_members} members")
                _take(changes, info, limits)
    except ArchiveRefused as exc:
        raise LayerError(f"layer refused: {exc}") from None
    except (tarfile.TarError, EOFError, ValueError, OverflowError, RecursionError) as exc:
        raise LayerError(f"layer is not a readable tar stream: {exc}") from None
    return changes


def _take(changes: Changeset, info: tarfile.TarInfo, limits: LayerLimits) -> None:
    if info.type == tarfile.DIRTYPE and names_the_root(info.name):
        return  # "./": the root itself, which every image has
    try:
        path = safe_member_name(info.name)
    except UnsafePath as exc:
        raise LayerError(f"layer refused: {exc}") from None
    if CONTROL.search(path):  # the guest reads member lists line by line
        raise LayerError(f"layer refused: {path[:80]!r} has a control character in its name")
    kind = _KINDS.get(info.type)
    if kind is None:  # devices (the guest's /dev is devtmpfs), sparse and stranger types
        raise LayerError(f"layer refused: {path!r} is {member_type(info.type)}")
    folder, _, base = path.rpartition("/")
    if base == OPAQUE_MARKER:
        changes.opaque.append(folder)
        return
    if base.startswith(WHITEOUT_PREFIX):
        hidden = base[len(WHITEOUT_PREFIX) :]
        if not hidden or hidden in (".", ".."):
            raise LayerError(f"layer refused: whiteout {path!r} names nothing")
        changes.deleted.append(f"{folder}/{hidden}" if folder else hidden)
        return
    if kind == KIND_FILE:
        if not 0 <= info.size <= limits.max_file_bytes:
            raise LayerError(f"layer refused: {path!r} is over {limits.max_file_bytes} bytes")
        changes.content_bytes += info.size
        if changes.content_bytes > limits.max_layer_bytes:
            raise LayerError(f"layer is over {limits.max_layer_bytes} bytes")
    link = ""
    if kind == KIND_HARDLINK:
        try:
            link = safe_member_name(info.linkname)
        except UnsafePath as exc:
            raise LayerError(f"layer refused: hard link {path!r}: {exc}") from None
    elif kind == KIND_SYMLINK:
        link = info.linkname
        if not link or "\x00" in link or len(link.encode("utf-8", "replace")) > MAX_LINK_BYTES:
            raise LayerError(f"layer refused: symbolic link {path!r} has a bad target")
    size = info.size if kind == KIND_FILE else 0
    changes.entries.append(Entry(path, kind, size, info.mode & 0o7777, link))


@dataclass(frozen=True, slots=True)
class Placed:
    """A path of the flattened root: the layer (index, lowest 0) and entry providing it."""

    layer: int
    entry: Entry


def flatten(
    changesets: Sequence[Changeset], limits: LayerLimits = LayerLimits()
) -> dict[str, Placed]:
    """The root the stacked layers make, whiteouts applied: path -> where it comes from.

    Raises LayerError where a guest unpacking the layers with busybox tar would
    not land where this says: a member or whiteout whose path runs through a
    symbolic link or a file (tar would follow the link, out of the folder), a
    folder replacing a non-folder or the reverse (tar keeps the old one or
    gives up on the layer), a hard link to a path that is not a file by then;
    and for more than ``max_image_members`` members in all. Time is linear in
    the members and whiteouts: each path is indexed under its parent.
    """
    root = _Root()
    members = 0
    for index, changes in enumerate(changesets):
        members += len(changes.entries) + len(changes.deleted) + len(changes.opaque)
        if members > limits.max_image_members:
            raise LayerError(f"the image has over {limits.max_image_members} members in all")
        for folder in changes.opaque:
            root.check_parents(folder, f"{folder}/{OPAQUE_MARKER}")
            root.remove(folder, keep_self=True)
        for path in changes.deleted:
            root.check_parents(path, path)
            root.remove(path, keep_self=False)
        for entry in changes.entries:
            root.check_parents(entry.path, entry.path)
            previous = root.paths.get(entry.path)
            if previous is not None and (previous.entry.kind == KIND_DIR) != (
                entry.kind == KIND_DIR
            ):
                raise LayerError(
                    f"layer refused: {entry.path!r} turns a {previous.entry.kind} into a "
                    f"{entry.kind} without a whiteout"
                )
            if entry.kind == KIND_HARDLINK:
                target = root.paths.get(entry.link)
                if target is None or target.entry.kind not in (KIND_FILE, KIND_HARDLINK):
                    raise LayerError(
                        f"layer refused: hard link {entry.path!r} to {entry.link!r}, no file"
                    )
            root.add(Placed(index, entry))
    return dict(sorted(root.paths.items()))


class _Root:
    """Paths placed so far, and each folder's children, so a removal touches only its own."""

    def __init__(self) -> None:
        self.paths: dict[str, Placed] = {}
        self.children: dict[str, set[str]] = {}

    def add(self, placed: Placed) -> None:
        path = placed.entry.path
        self.paths[path] = placed
        while path:  # every folder on the way knows its child, listed or implied
            parent = path.rpartition("/")[0]
            self.children.setdefault(parent, set()).add(path)
            path = parent

    def remove(self, path: str, *, keep_self: bool) -> None:
        doomed = []
        stack = list(self.children.pop(path, ()))
        while stack:
            name = stack.pop()
            doomed.append(name)
            stack.extend(self.children.pop(name, ()))
        if path and not keep_self:
            doomed.append(path)
            self.children.get(path.rpartition("/")[0], set()).discard(path)
        for name in doomed:
            self.paths.pop(name, None)

    def check_parents(self, path: str, what: str) -> None:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            above = self.paths.get("/".join(parts[:depth]))
            if above is not None and above.entry.kind != KIND_DIR:
                kind = above.entry.kind
                raise LayerError(
                    f"layer refused: {what!r} lies under {above.entry.path!r}, a {kind}"
                )


def root_bytes(root: dict[str, Placed]) -> int:
    """The bytes of file content the flattened root holds."""
    return sum(placed.entry.size for placed in root.values())
