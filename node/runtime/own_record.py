"""This node's own peer record: signed, its sequence number persisted first, refreshed.

``OwnRecord.sign`` raises the persisted ``record_seq`` counter (at least to
``min_seq``) *before* signing, so a record can never leave the process with a
sequence number a restart could hand out again. The record carries our
advertised underlay endpoints (``network.advertise``, or the listen address
when it is a specific one), our overlay address, what this host can run
(``local_capabilities``), the WireGuard port and an expiry
``record.lifetime_s`` from now.

``resign`` signs a new record and hands it to every subscriber in the order
they subscribed (the membership core, then mDNS when it runs); ``run``
re-signs every third of the lifetime, so peers never hold an expired record
of a live node. The membership core asks for a re-sign with a higher
``min_seq`` when it must refute a suspicion (``RefreshOwnRecord``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv6Address

import trio

from node import __version__
from node.base.identity import Identity
from node.base.records import Capabilities, PeerRecord, sign_record
from node.runtime.config import Config
from node.runtime.host_probe import host_facts
from node.runtime.state import State
from node.runtime.transport import Transport

RECORD_SEQ_KEY = "record_seq"

Subscriber = Callable[[PeerRecord], Awaitable[None]]


def local_capabilities() -> Capabilities:
    facts = host_facts()
    return Capabilities(
        arch=facts.arch,
        vcpus=facts.vcpus,
        memory_mb=facts.memory_mib,
        kvm=facts.kvm,
        bench_score=0,
    )


class OwnRecord:
    def __init__(
        self,
        identity: Identity,
        config: Config,
        state: State,
        transport: Transport,
        overlay_address: IPv6Address,
    ) -> None:
        self.identity = identity
        self.config = config
        self.state = state
        self.transport = transport
        self.overlay_address = overlay_address
        self.record: PeerRecord | None = None
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        """``subscriber`` gets every record signed by ``resign`` from now on."""
        self._subscribers.append(subscriber)

    def advertised_endpoints(self) -> tuple[str, ...]:
        configured = tuple(self.config["network.advertise"])
        if configured:
            return configured
        host, port = self.transport.underlay_address
        if host in ("0.0.0.0", "::", ""):
            return ()
        return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}",)

    async def sign(self, min_seq: int) -> PeerRecord:
        """A new record, now ours; its sequence number is persisted before it is signed."""
        seq = await trio.to_thread.run_sync(self.state.raise_counter, RECORD_SEQ_KEY, min_seq)
        self.record = sign_record(
            self.identity,
            endpoints=self.advertised_endpoints(),
            overlay_address=str(self.overlay_address),
            capabilities=local_capabilities(),
            version=__version__,
            seq=seq,
            expires=int(time.time()) + self.config["record.lifetime_s"],
            wg_port=self.config["network.wireguard_port"],
        )
        return self.record

    async def resign(self, min_seq: int) -> None:
        record = await self.sign(min_seq)
        for subscriber in self._subscribers:
            await subscriber(record)

    async def run(self) -> None:
        """Re-sign every third of the record's lifetime."""
        while True:
            await trio.sleep(self.config["record.lifetime_s"] / 3)
            await self.resign(0)
