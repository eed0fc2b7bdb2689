"""Node identity: the Ed25519 node key, the X25519 WireGuard key, and node ids.

A node is its Ed25519 public key. The node id is that key in lowercase base32
without padding (52 characters); its first 12 characters are the short form shown
in tables. The WireGuard key is a separate X25519 key, bound to the node key only
by the signed peer record (see records.py), so it can be rotated without changing
who the node is.

The keys' files are node/runtime/keystore.py's: this module does no I/O.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey

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
