"""The host side of the market around the bidder core: what it does when a replica ends.

The real SegmentService runs the replica, on the fake libvirt twin (segments.vm.fake,
itself tested against libvirt in test_vm_libvirt.py), so a failure can be injected.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio
from kit.market import NONCE
from kit.market import identity as _identity
from kit.replica import fake_host_service

from node.market.bidder import HostPolicy
from node.market.message_fields import MarketKind
from node.market.offer_messages import Requirements, Winner, decode_bid, sign_award, sign_offer
from node.market.outcome_messages import decode_withdraw
from node.runtime.market_host import HostMarket
from segments.vm.fake import FakeVmRuntime

OWNER, HOST = _identity(1), _identity(2)
POLICY = HostPolicy(vcpus=2, memory_mib=1024, disk_mib=10_000, replicas=2)


def test_a_replica_that_fails_is_withdrawn_from_its_owner_and_counted(
    tmp_path: Path,
) -> None:
    image = SimpleNamespace(
        kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img", cmdline="", memory_mb=96
    )
    runtime = FakeVmRuntime("fake:///a", {})
    runtime.fail_next("start", "qemu died")
    segments = fake_host_service(tmp_path, "a", runtime, image)
    sent: list[tuple[Any, MarketKind, bytes]] = []

    async def send(target: Any, kind: MarketKind, blob: bytes) -> None:
        sent.append((target, kind, blob))

    market = HostMarket(HOST, POLICY, segments, send, lambda _node: None)
    offer = sign_offer(
        OWNER, job_nonce=NONCE, segment=0, attempt=1, image="0" * 64,
        requirements=Requirements(96, 1), extent_s=10, checkpoint=None, checkpoint_size=0,
        holders=(), k=1, ceiling=10, bid_deadline=int(time.time()) + 60,
    )  # fmt: skip

    def of(kind: MarketKind) -> list[bytes]:
        return [blob for _, k, blob in sent if k is kind]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(market.run)
            await market.deliver(OWNER.node_id, MarketKind.OFFER, offer.blob)
            [bid] = of(MarketKind.BID)
            winner = Winner(HOST.node_id, decode_bid(bid).price)
            award = sign_award(OWNER, offer.ref, (winner,))
            await market.deliver(OWNER.node_id, MarketKind.AWARD, award.blob)
            with trio.fail_after(10):
                while not of(MarketKind.WITHDRAW):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    segments.close()
    [withdraw] = [decode_withdraw(blob) for blob in of(MarketKind.WITHDRAW)]
    assert withdraw.ref == offer.ref and "qemu died" in withdraw.reason and not withdraw.live
    assert market.view()["statistics"]["replicas_failed"] >= 1
    assert market.running == {} and market.offers == {}


def test_a_checkpoint_larger_than_its_offer_said_is_refused_before_it_is_fetched(
    tmp_path: Path,
) -> None:
    image = SimpleNamespace(
        kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img", cmdline="", memory_mb=96
    )
    segments = fake_host_service(tmp_path, "a", FakeVmRuntime("fake:///a", {}), image)
    (tmp_path / "big").write_bytes(b"x" * 100_000)
    held = segments.store.put_file(tmp_path / "big", OWNER)  # as if fetched earlier
    sent: list[tuple[Any, MarketKind, bytes]] = []

    async def send(target: Any, kind: MarketKind, blob: bytes) -> None:
        sent.append((target, kind, blob))

    market = HostMarket(HOST, POLICY, segments, send, lambda _node: None)
    offer = sign_offer(
        OWNER, job_nonce=NONCE, segment=1, attempt=1, image="0" * 64,
        requirements=Requirements(96, 1), extent_s=10, checkpoint=held.digest,
        checkpoint_size=1000, holders=(OWNER.node_id,), k=1, ceiling=10,
        bid_deadline=int(time.time()) + 60,
    )  # fmt: skip

    def of(kind: MarketKind) -> list[bytes]:
        return [blob for _, k, blob in sent if k is kind]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(market.run)
            await market.deliver(OWNER.node_id, MarketKind.OFFER, offer.blob)
            [bid] = of(MarketKind.BID)
            award = sign_award(OWNER, offer.ref, (Winner(HOST.node_id, decode_bid(bid).price),))
            await market.deliver(OWNER.node_id, MarketKind.AWARD, award.blob)
            with trio.fail_after(10):
                while not of(MarketKind.WITHDRAW):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    segments.close()
    [withdraw] = [decode_withdraw(blob) for blob in of(MarketKind.WITHDRAW)]
    assert "a checkpoint of 100000 bytes, not offered" in withdraw.reason
