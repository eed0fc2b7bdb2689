"""The node's key files in its state directory.

Keys are written 0600 through a temporary file and an atomic rename, so a crash
never leaves half a key behind. A key file that exists but is unreadable or the
wrong size is an error, never silently replaced: that would change the node's
identity.
"""

from __future__ import annotations

import os
from pathlib import Path

from node.base.identity import KEY_BYTES, Identity, IdentityError

NODE_KEY_FILE = "node.key"
WG_KEY_FILE = "wireguard.key"


def load_or_create(state_dir: Path) -> Identity:
    """Load the node's keys from `state_dir`, creating any that do not exist yet."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    node_seed = _load_or_create_key(state_dir / NODE_KEY_FILE)
    wireguard_seed = _load_or_create_key(state_dir / WG_KEY_FILE)
    return Identity.from_seeds(node_seed, wireguard_seed)


def _load_or_create_key(path: Path) -> bytes:
    if path.exists():
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise IdentityError(f"cannot read key file {path}: {exc.strerror}") from exc
        if len(data) != KEY_BYTES:
            raise IdentityError(
                f"key file {path} holds {len(data)} bytes, expected {KEY_BYTES}; "
                "refusing to replace it (that would change this node's identity)"
            )
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return data
    seed = os.urandom(KEY_BYTES)
    _write_private(path, seed)
    return seed


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` mode 0600, durably, all or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
