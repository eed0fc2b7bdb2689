"""Node identity: the Ed25519 node key, the X25519 WireGuard key, and node ids.

A node is its Ed25519 public key. The node id is that key in lowercase base32
without padding (52 characters); its first 12 characters are the short form shown
in tables. The WireGuard key is a separate X25519 key, bound to the node key only
by the signed peer record (see records.py), so it can be rotated without changing
who the node is.

Keys live in the state directory, written 0600 through a temporary file and an
atomic rename, so a crash never leaves half a key behind. A key file that exists
but is unreadable or the wrong size is an error, never silently replaced: that
would change the node's identity.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey

NODE_KEY_FILE = "node.key"
WG_KEY_FILE = "wireguard.key"
KEY_BYTES = 32
SHORT_ID_CHARS = 12


class IdentityError(Exception):
    """The node's key files are missing, unreadable or malformed."""


@dataclass(frozen=True, slots=True, order=True)
class NodeId:
    """A node's Ed25519 public key, printed as lowercase base32."""

    key: bytes

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise ValueError(f"a node id is {KEY_BYTES} bytes, got {len(self.key)}")

    def __str__(self) -> str:
        return base64.b32encode(self.key).decode("ascii").rstrip("=").lower()

    @property
    def short(self) -> str:
        return str(self)[:SHORT_ID_CHARS]

    @classmethod
    def parse(cls, text: str) -> NodeId:
        """Parse the printed form; raise ValueError on anything else."""
        cleaned = text.strip().upper()
        if len(cleaned) != 52:
            raise ValueError(f"a node id has 52 base32 characters, got {len(cleaned)}")
        try:
            return cls(base64.b32decode(cleaned + "===="))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a node id: {text!r}") from exc


@dataclass(frozen=True, slots=True)
class Identity:
    """The node's two private keys."""

    signing_key: SigningKey
    wireguard_key: PrivateKey

    @property
    def node_id(self) -> NodeId:
        return NodeId(bytes(self.signing_key.verify_key))

    @property
    def verify_key(self) -> VerifyKey:
        return self.signing_key.verify_key

    @property
    def wireguard_public(self) -> bytes:
        return bytes(self.wireguard_key.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature

    @classmethod
    def generate(cls) -> Identity:
        return cls(SigningKey.generate(), PrivateKey.generate())

    @classmethod
    def from_seeds(cls, node_seed: bytes, wireguard_seed: bytes) -> Identity:
        return cls(SigningKey(node_seed), PrivateKey(wireguard_seed))


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
