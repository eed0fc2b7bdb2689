"""The agent's host side of the market: the bidder core, and the replicas it starts.

``HostMarket`` feeds MARKET frames to ``node.bidder.Bidder`` and carries out
its effects:

- ``SendStatement``: a MARKET frame (a bid, a completion) to the job's owner.
- ``StartReplica``: a task fetches the offer's checkpoint manifest and the
  blocks this node lacks from the holders the offer names, runs the extent
  through ``SegmentService.run_replica`` and reports ``ReplicaFinished`` (the
  new checkpoint's digest, size and guest progress) or ``ReplicaFailed``.
- ``StopReplica``: cancels a running replica (it stops at its next poll) and
  drops the checkpoint it made, unless the owner committed it here.
- ``CheckpointCommitted``: a checkpoint this node holds for the owner is kept.

Offers are screened before the bidder sees them: our own jobs (a node does
not bid on what it pays for) and images this node does not have are declined
and counted. ``held_bytes`` tells the bidder how much of the offer's
checkpoint is already here (data locality lowers its finish estimate).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from node.bidder import (
    AwardReceived,
    Bidder,
    CancelReceived,
    CheckpointCommitted,
    CommitReceived,
    HostPolicy,
    OfferReceived,
    ReplicaFailed,
    ReplicaFinished,
    StartReplica,
    StopReplica,
)
from node.config import Config
from node.guest_address import GuestAddressError, grant_address, market_tap_name, route_guest
from node.handoff import decode_handed_off, decode_handoff
from node.identity import Identity, NodeId
from node.market import MarketKind, Offer, SendStatement, decode_offer, refusal_of
from node.market_owner import guarded
from node.routing import RouteService
from node.segment_service import (
    ReplicaOrder,
    ReplicaOutcome,
    SegmentError,
    SegmentService,
    market_vm_name,
)
from node.wire import RemoteProtocolError
from segments.image import ImageError, load
from segments.manifest import Manifest
from segments.transfer import FetchError, fetch_manifest

log = logging.getLogger("gleaner.market")

SendMarket = Callable[[NodeId, MarketKind, bytes], Awaitable[None]]
BlockEndpoint = Callable[[NodeId], "tuple[str, int] | None"]
HOST_RESERVED_MIB = 512  # guest memory the default cap leaves to the host


def host_policy(config: Config, draining: bool = False) -> HostPolicy:
    """The caps this host lends, from ``[host]`` (0 = all it has)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    except (ValueError, OSError):
        physical = 0
    return HostPolicy(
        vcpus=config["host.vcpus"] or os.cpu_count() or 1,
        memory_mib=config["host.memory_mib"] or max(physical - HOST_RESERVED_MIB, 0),
        disk_mib=config["host.disk_mib"],
        replicas=config["host.replicas"],
        draining=draining,
        price_floor=config["host.price_floor"],
        arch=platform.machine() or "x86_64",
        kvm=os.path.exists("/dev/kvm"),
    )


class HostMarket:
    def __init__(
        self,
        identity: Identity,
        policy: HostPolicy,
        segments: SegmentService,
        send: SendMarket,
        block_endpoint: BlockEndpoint,
        routes: RouteService | None = None,
    ) -> None:
        self.identity = identity
        self.routes = routes  # None: no overlay here, so no network jobs
        self.bidder = Bidder(identity, policy)
        self.segments = segments
        self.send = send
        self.block_endpoint = block_endpoint
        self.stats: Counter[str] = Counter()
        self.running: dict[bytes, trio.Event] = {}  # offer digest -> cancel
        self.offers: dict[bytes, Offer] = {}  # offer digest -> the offer of a running replica
        self.made: dict[bytes, bytes] = {}  # offer digest -> the checkpoint we made
        self._images: dict[str, bool] = {}
        self._job_locks: dict[bytes, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self._lock = trio.Lock()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for name in await self.segments.reap_orphans():
            log.warning("stopped replica %s left running by an earlier run of this agent", name)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await self._execute(self.bidder.tick(time.time()))
                self._wake = trio.Event()  # after our own effects, which set the old one
                delay = self.bidder.next_wakeup() - time.time()
                if delay > 0:
                    with trio.move_on_after(min(delay, 5.0)):
                        await self._wake.wait()

    async def deliver(self, sender: NodeId, kind: int, blob: bytes) -> None:
        """A MARKET frame for the host side (offers, awards, cancels, commits)."""
        if kind == MarketKind.OFFER:
            event: Any = await self._screen_offer(blob)
            if event is None:
                return
        elif kind == MarketKind.AWARD:
            event = AwardReceived(blob)
        elif kind == MarketKind.CANCEL:
            event = CancelReceived(blob)
        elif kind == MarketKind.COMMIT:
            event = CommitReceived(blob)
        elif kind in (MarketKind.HANDOFF, MarketKind.HANDED_OFF):
            self._refuse_hand_off(kind, blob)
            return
        else:
            self.stats["frames_unexpected"] += 1
            return
        await self._execute(self.bidder.handle(event, time.time()))

    def _refuse_hand_off(self, kind: int, blob: bytes) -> None:
        """Live hand-off between hosts is not carried out here yet: count and drop."""
        try:
            (decode_handoff if kind == MarketKind.HANDOFF else decode_handed_off)(blob)
        except RemoteProtocolError as exc:
            self.stats[f"refused_{refusal_of(exc).value}"] += 1
            return
        self.stats["refused_mismatch"] += 1

    async def _screen_offer(self, blob: bytes) -> OfferReceived | None:
        try:
            offer = decode_offer(blob)
        except RemoteProtocolError:
            return OfferReceived(blob)  # the bidder refuses and counts it
        if offer.owner == self.identity.node_id:
            self.stats["declined_own_job"] += 1
            return None
        if not await self._have_image(offer.image):
            self.stats["declined_image"] += 1
            return None
        if offer.requirements.network and self.routes is None:
            self.stats["declined_network"] += 1  # no overlay here to route its address
            return None
        if offer.source is not None:
            self.stats["declined_live"] += 1  # adopting a migrating guest: not yet here
            return None
        return OfferReceived(blob, self._held_bytes(offer))

    async def _have_image(self, image_id: str) -> bool:
        if image_id not in self._images:
            try:
                await trio.to_thread.run_sync(load, self.segments.image_store, image_id)
                self._images[image_id] = True
            except ImageError:
                return False
        return True

    def _held_bytes(self, offer: Offer) -> int:
        if offer.checkpoint is None:
            return 0
        manifest = self.segments.store.manifest(offer.checkpoint)
        if manifest is None:
            return 0
        return manifest.total_size - sum(self.segments.store.missing(manifest).values())

    async def _execute(self, effects: list[Any]) -> None:
        async with self._lock:
            for effect in effects:
                if isinstance(effect, SendStatement):
                    await self.send(effect.target, effect.kind, effect.blob)
                elif isinstance(effect, StartReplica):
                    assert self._nursery is not None
                    cancel = trio.Event()
                    self.running[effect.offer.ref.digest] = cancel
                    self.offers[effect.offer.ref.digest] = effect.offer
                    self._nursery.start_soon(
                        guarded, self._run_replica, effect.offer, _grant_blob(effect), cancel
                    )
                elif isinstance(effect, StopReplica):
                    await self._stop(effect)
                elif isinstance(effect, CheckpointCommitted):
                    self.made.pop(effect.commit.ref.digest, None)
                    self.stats["commits_held" if effect.holder else "commits_elsewhere"] += 1
        self._wake.set()

    async def _stop(self, effect: StopReplica) -> None:
        cancel = self.running.pop(effect.ref.digest, None)
        if cancel is not None:
            cancel.set()
            self.stats["replicas_stopped"] += 1
        made = self.made.pop(effect.ref.digest, None)
        if made is not None:
            await trio.to_thread.run_sync(self.segments.store.remove_manifest, made)
            await trio.to_thread.run_sync(self.segments.store.gc)
        log.info("replica of segment %d stopped: %s", effect.ref.segment, effect.reason)

    async def _run_replica(self, offer: Offer, grant: bytes | None, cancel: trio.Event) -> None:
        ref = offer.ref
        name = _vm_name(offer)
        lock = self._job_locks.setdefault(ref.job_id, trio.Lock())
        try:
            checkpoint, holders = None, []
            if offer.checkpoint is not None:
                holders = [e for e in map(self.block_endpoint, offer.holders) if e is not None]
                checkpoint = self.segments.store.manifest(offer.checkpoint)
                if checkpoint is None:
                    checkpoint = await fetch_manifest(offer.checkpoint, holders)
            tap = market_tap_name(ref.job_id) if grant is not None else None
            order = ReplicaOrder(
                name=name,
                segment=ref.segment,
                attempt=ref.attempt,
                image_id=offer.image,
                args=offer.args,
                vcpus=offer.requirements.vcpus,
                extent_cpu_s=float(offer.extent_s),
                memory_mib=offer.requirements.memory_mib,
                tap=tap,
                address=str(grant_address(grant)) if grant is not None else None,
            )
            async with lock:  # a stopped replica of this job may still be tearing down
                outcome = await self._run_addressed(order, checkpoint, holders, cancel, grant)
        except (SegmentError, FetchError, GuestAddressError) as exc:
            self.running.pop(ref.digest, None)
            self.offers.pop(ref.digest, None)
            if cancel.is_set() and not isinstance(exc, GuestAddressError):
                return  # stopped on purpose; the bidder already let it go
            self.stats["replicas_failed"] += 1
            log.warning("replica %s failed: %s", name, exc)
            await self._execute(self.bidder.handle(ReplicaFailed(ref, str(exc)), time.time()))
            return
        self.running.pop(ref.digest, None)
        self.offers.pop(ref.digest, None)
        result = outcome.result
        self.made[ref.digest] = result.checkpoint.digest
        self.stats["replicas_finished"] += 1
        log.info(
            "replica %s finished: %.1f vCPU-s in %.1f s%s",
            name,
            result.cpu_s,
            result.wall_s,
            " (guest powered off)" if result.powered_off else "",
        )
        finished = ReplicaFinished(
            ref,
            result.checkpoint.digest,
            result.checkpoint.total_size,
            result.progress,
            int(result.cpu_s * 1000),
            halted=result.powered_off,
        )
        await self._execute(self.bidder.handle(finished, time.time()))

    async def _run_addressed(
        self,
        order: ReplicaOrder,
        checkpoint: Manifest | None,
        holders: list[tuple[str, int]],
        cancel: trio.Event,
        grant: bytes | None,
    ) -> ReplicaOutcome:
        """Run the replica; a network job's guest gets its address routed and claimed
        here while it runs, and withdrawn when it ends, however it ends."""
        if grant is None or order.tap is None or self.routes is None:
            return await self.segments.run_replica(order, checkpoint, holders, cancel)
        routes, tap, routing = self.routes, order.tap, trio.CancelScope()
        unreachable = False

        async def route() -> None:
            nonlocal unreachable
            with routing:
                if not await route_guest(routes, grant, tap):
                    unreachable = True
                    cancel.set()

        assert self._nursery is not None
        self._nursery.start_soon(route)
        try:
            return await self.segments.run_replica(order, checkpoint, holders, cancel)
        except SegmentError:
            if unreachable:
                message = f"the guest's address could not be claimed on {tap}"
                raise GuestAddressError(message) from None
            raise
        finally:
            routing.cancel()
            with trio.CancelScope(shield=True):
                await routes.detach(grant_address(grant))

    # -- the volunteer comes first (node/host_policy.py decides; these carry it out) ----

    def hold_guests(self, held: bool) -> int:
        """Pause (or resume) every replica's guest at its next poll; how many there are."""
        self.segments.held = held
        for replica in list(self.segments.replicas.values()):
            replica.hold(held)
        return len(self.segments.replicas)

    async def vacate(self, reason: str) -> int:
        """Empty this host: replicas with siblings are given up (WITHDRAW), a sole one
        checkpoints where it is and completes early. Returns how many were running."""
        count = 0
        for digest in list(self.running):
            offer = self.offers.get(digest)
            if offer is None:
                continue
            count += 1
            if offer.k > 1:
                self.running.pop(digest).set()
                self.stats["replicas_vacated"] += 1
                await self._execute(
                    self.bidder.handle(ReplicaFailed(offer.ref, reason), time.time())
                )
            else:
                replica = self.segments.replicas.get(f"gl-{_vm_name(offer)}")
                if replica is not None:
                    replica.finish_now()
                    self.stats["replicas_finished_early"] += 1
        return count

    def guest_names(self) -> list[str]:
        """The libvirt domains of the replicas running here."""
        return [f"gl-{_vm_name(self.offers[d])}" for d in self.running if d in self.offers]

    def set_policy(self, policy: HostPolicy) -> None:
        self.bidder.policy = policy

    def view(self) -> dict[str, Any]:
        free = self.bidder.free()
        return {
            "statistics": dict(Counter(self.bidder.statistics()) + self.stats),
            "free": {
                "vcpus": free.vcpus,
                "memory_mib": free.memory_mib,
                "disk_mib": free.disk_mib,
                "slots": free.slots,
            },
            "commitments": [
                {
                    "job_id": c.ref.job_id.hex(),
                    "segment": c.ref.segment,
                    "attempt": c.ref.attempt,
                    "phase": c.phase.value,
                }
                for c in self.bidder.commitments()
            ],
        }


def _vm_name(offer: Offer) -> str:
    """One domain name per job (see MARKET_VM in node/segment_service.py)."""
    return market_vm_name(offer.ref.job_id)


def _grant_blob(start: StartReplica) -> bytes | None:
    """The signed route grant a network job's award gave this host (None: no network)."""
    grant = start.award.grant
    return grant.blob if grant is not None and grant.blob else None
