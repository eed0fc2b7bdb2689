"""The agent's host side of the market: the bidder core, and the replicas it starts.

``HostMarket`` feeds MARKET frames to ``node.market.bidder.Bidder`` and carries out
its effects:

- ``SendStatement``: a MARKET frame (a bid, a completion) to the job's owner.
- ``StartReplica``: a task fetches the offer's checkpoint manifest and the
  blocks this node lacks from the holders the offer names, runs the extent
  through ``SegmentService.run_replica`` and reports ``ReplicaFinished`` (the
  new checkpoint's digest, size and guest progress) or ``ReplicaFailed``.
- ``StopReplica``: cancels a running replica (it stops at its next poll) and
  drops the checkpoint it made, unless the owner committed it here.
- ``RetainCheckpoint``: a checkpoint this node holds for the owner is kept.

A live hand-off (node/market/handoff.py) has a side here on both hosts. Leaving
(``vacate`` of a network job's sole replica, where this host can migrate):
ask the owner to move it live, migrate the guest to the host that brings the
owner's award (HANDOFF), tell it the console (HANDED_OFF); with no taker
within ``HANDOFF_WAIT_S`` checkpoint where it is, as before. Arriving (a won
live offer): adopt the guest instead of restoring, route its address when
its tap appears and claim it when it runs here, and put the source's console
in front of ours.

Offers are screened before the bidder sees them: our own jobs (a node does
not bid on what it pays for), images this node does not have, and live moves
where this host cannot take a migration are declined and counted.
``held_bytes`` tells the bidder how much of the offer's checkpoint is already
here (data locality lowers its finish estimate).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any, assert_never

import trio

from node.base.identity import Identity, NodeId
from node.base.wire import RemoteProtocolError
from node.market.bidder import (
    AwardReceived,
    Bidder,
    BidderEffect,
    BidderEvent,
    CancelReceived,
    CommitReceived,
    HandOffRequested,
    HostPolicy,
    OfferReceived,
    ReplicaFailed,
    ReplicaFinished,
    ReplicaHandedOff,
    RetainCheckpoint,
    StartReplica,
    StopReplica,
)
from node.market.handoff import (
    Handoff,
    decode_handed_off,
    decode_handoff,
    sign_handed_off,
    sign_handoff,
)
from node.market.message_fields import MarketKind, OfferRef, refusal_of
from node.market.messages import SendStatement
from node.market.offer_messages import Offer, decode_award, decode_offer
from node.runtime.guest_address import (
    GuestAddressError,
    grant_address,
    market_tap_name,
    route_guest,
)
from node.runtime.market_owner import guarded
from node.runtime.replica_orders import ReplicaOrder, ReplicaOutcome
from node.runtime.routing import RouteService
from node.runtime.segment_service import (
    SegmentError,
    SegmentMigrated,
    SegmentService,
    market_vm_name,
)
from segments.image.store import ImageError
from segments.store.manifest import Manifest
from segments.store.transfer import FetchError, fetch_manifest

log = logging.getLogger("gleaner.market")

SendMarket = Callable[[NodeId, MarketKind, bytes], Awaitable[None]]
BlockEndpoint = Callable[[NodeId], "tuple[str, int] | None"]
HANDOFF_WAIT_S = 30.0  # a live move nobody takes: checkpoint where it is after this
PREFIX_TRIES, PREFIX_RETRY_S = 50, 0.1
HAND_OFFS_KEPT = 16


class HostMarket:
    def __init__(
        self,
        identity: Identity,
        policy: HostPolicy,
        segments: SegmentService,
        send: SendMarket,
        block_endpoint: BlockEndpoint,
        routes: RouteService | None = None,
        migration: tuple[str, str] | None = None,
    ) -> None:
        self.identity = identity
        self.routes = routes  # None: no overlay here, so no network jobs
        # (libvirt URI, stream address) other hosts migrate a guest here with; None: no
        # live hand-off in or out
        self.migration = migration
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
        self._handing: dict[bytes, tuple[NodeId, OfferRef]] = {}  # ours -> destination
        self._adopting: dict[bytes, str] = {}  # live offer -> why its hand-off failed ("")
        self._hand_offs_asked: set[bytes] = set()
        self.hand_offs: deque[dict[str, Any]] = deque(maxlen=HAND_OFFS_KEPT)  # for `market`

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
            offered = await self._screen_offer(blob)
            if offered is None:
                return
            event: BidderEvent = offered
        elif kind == MarketKind.AWARD:
            event = AwardReceived(blob)
        elif kind == MarketKind.CANCEL:
            event = CancelReceived(blob)
        elif kind == MarketKind.COMMIT:
            event = CommitReceived(blob)
        elif kind == MarketKind.HANDOFF:
            await self._on_handoff(sender, blob)
            return
        elif kind == MarketKind.HANDED_OFF:
            await self._on_handed_off(sender, blob)
            return
        else:
            self.stats["frames_unexpected"] += 1
            return
        await self._execute(self.bidder.handle(event, time.time()))

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
        if offer.source is not None and (self.migration is None or offer.work is not None):
            self.stats["declined_live"] += 1  # no way for a guest (or its disks) to move here
            return None
        if offer.work is not None and self.segments.bundles is None:
            self.stats["declined_image"] += 1  # no image library here
            return None
        return OfferReceived(blob, self._held_bytes(offer))

    async def _have_image(self, image_id: str) -> bool:
        if image_id not in self._images:
            try:
                await trio.to_thread.run_sync(
                    self.segments.load_image, self.segments.image_store, image_id
                )
                self._images[image_id] = True
            except ImageError:
                return False
        return True

    def _held_bytes(self, offer: Offer) -> int:
        held, store, bundles = 0, self.segments.store, self.segments.bundles
        if offer.work is not None and bundles is not None:
            held = bundles.image_held(offer.work)
        manifest = None if offer.checkpoint is None else store.manifest(offer.checkpoint)
        if manifest is None:
            return held
        return held + manifest.total_size - sum(store.missing(manifest).values())

    async def _execute(self, effects: list[BidderEffect]) -> None:
        async with self._lock:
            for effect in effects:
                await self._carry_out(effect)
        self._wake.set()

    async def _carry_out(self, effect: BidderEffect) -> None:
        match effect:
            case SendStatement():
                await self.send(effect.target, effect.kind, effect.blob)
            case StartReplica():
                self._start(effect)
            case StopReplica():
                await self._stop(effect)
            case RetainCheckpoint():
                self.made.pop(effect.commit.ref.digest, None)
                self.stats["commits_held" if effect.holder else "commits_elsewhere"] += 1
            case _:
                assert_never(effect)

    def _start(self, effect: StartReplica) -> None:
        assert self._nursery is not None
        cancel = trio.Event()
        self.running[effect.offer.ref.digest] = cancel
        self.offers[effect.offer.ref.digest] = effect.offer
        self._nursery.start_soon(
            guarded, self._run_replica, effect.offer, _grant_blob(effect), cancel
        )
        if effect.offer.source is not None:
            self._adopting[effect.offer.ref.digest] = ""
            self._nursery.start_soon(guarded, self._ask_for_guest, effect)

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
            holders = [e for e in map(self.block_endpoint, offer.holders) if e is not None]
            checkpoint = None
            if offer.checkpoint is not None and offer.source is None:
                checkpoint = self.segments.store.manifest(offer.checkpoint)
                if checkpoint is None:
                    checkpoint = await fetch_manifest(offer.checkpoint, holders)
                if checkpoint.total_size > offer.checkpoint_size:  # what the bid reserved
                    raise SegmentError(
                        f"a checkpoint of {checkpoint.total_size} bytes, not offered"
                    )
            owner = self.block_endpoint(offer.owner)
            order = _order(offer, grant, tuple(([owner] if owner else []) + holders))
            async with lock:  # a stopped replica of this job may still be tearing down
                outcome = await self._run_addressed(order, checkpoint, holders, cancel, grant)
        except SegmentMigrated as moved:
            await self._handed_off(offer, moved)
            return
        except (SegmentError, FetchError, GuestAddressError) as exc:
            not_arrived = self._forget(ref)
            if cancel.is_set() and not not_arrived and not isinstance(exc, GuestAddressError):
                return  # stopped on purpose; the bidder already let it go
            reason = f"the guest did not arrive: {not_arrived}" if not_arrived else str(exc)
            self.stats["replicas_failed"] += 1
            log.warning("replica %s failed: %s", name, reason)
            await self._execute(self.bidder.handle(ReplicaFailed(ref, reason), time.time()))
            return
        self._forget(ref)
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

        def arrived() -> bool:
            replica = self.segments.replicas.get(f"gl-{order.name}")
            return replica is not None and replica.arrived.is_set()

        async def route() -> None:
            nonlocal unreachable
            with routing:
                if not await route_guest(routes, grant, tap, arrived if order.adopt else None):
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

    # -- the volunteer comes first (node/policy/machine.py decides; these carry it out) ----

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
            elif offer.requirements.network and self.migration and offer.work is None:
                if digest not in self._hand_offs_asked:  # a drain, then a grace: ask once
                    self._hand_offs_asked.add(digest)
                    await self._request_hand_off(offer, reason)
            else:
                self._finish_early(offer)
        return count

    def _forget(self, ref: OfferRef) -> str:
        """A replica of ours ended, however: drop what we kept of it. Returns why its
        guest never arrived, if it was adopting one that did not ("" otherwise)."""
        digest = ref.digest
        self.running.pop(digest, None)
        self.offers.pop(digest, None)
        self._handing.pop(digest, None)
        self._hand_offs_asked.discard(digest)
        return self._adopting.pop(digest, "")

    def _finish_early(self, offer: Offer) -> None:
        replica = self.segments.replicas.get(f"gl-{_vm_name(offer)}")
        if replica is not None:
            replica.finish_now()
            self.stats["replicas_finished_early"] += 1

    # -- live hand-off: leaving --------------------------------------------------------

    async def _request_hand_off(self, offer: Offer, reason: str) -> None:
        used_ms = int(await self.segments.cpu_time_s(f"gl-{_vm_name(offer)}") * 1000)
        event = HandOffRequested(offer.ref, reason, used_ms)
        await self._execute(self.bidder.handle(event, time.time()))
        assert self._nursery is not None
        self._nursery.start_soon(guarded, self._fall_back, offer)

    async def _fall_back(self, offer: Offer) -> None:
        """Nobody came for the guest in time: checkpoint it where it is."""
        await trio.sleep(HANDOFF_WAIT_S)
        digest = offer.ref.digest
        if digest in self.running and digest not in self._handing:
            self.stats["hand_offs_fell_back"] += 1
            log.info("no host took segment %d live: checkpointing it here", offer.ref.segment)
            self._finish_early(offer)

    async def _on_handoff(self, sender: NodeId, blob: bytes) -> None:
        """The owner's chosen destination asks for our guest: migrate it there."""
        try:
            handoff = decode_handoff(blob)
        except RemoteProtocolError as exc:
            self.stats[f"refused_{refusal_of(exc).value}"] += 1
            return
        job_id = handoff.offer.ref.job_id
        mine = [o for d, o in self.offers.items() if d in self.running and o.ref.job_id == job_id]
        fits = (
            handoff.host == sender
            and handoff.offer.source == self.identity.node_id
            and len(mine) == 1
            and mine[0].owner == handoff.offer.owner
        )
        if not fits:
            self.stats["refused_mismatch"] += 1
            return
        offer = mine[0]
        if offer.ref.digest in self._handing:
            self.stats["handoffs_duplicate"] += 1
            return
        self._handing[offer.ref.digest] = (handoff.host, handoff.offer.ref)
        assert self._nursery is not None
        self._nursery.start_soon(guarded, self._send_guest, offer, handoff)

    async def _send_guest(self, offer: Offer, handoff: Handoff) -> None:
        name = f"gl-{_vm_name(offer)}"
        log.info("migrating %s live to %s", name, handoff.host.short)
        try:
            error = await self.segments.migrate_replica(
                name, handoff.uri, handoff.address, handoff.spec
            )
        except SegmentError as exc:  # it ended meanwhile, or no outcome in time
            error = str(exc)
        if error is None:
            return  # _run_replica sees the replica end as migrated and tells the destination
        self._handing.pop(offer.ref.digest, None)
        self.stats["hand_offs_failed"] += 1
        log.warning("live migration of %s to %s failed: %s", name, handoff.host.short, error)
        reply = sign_handed_off(self.identity, handoff.offer.ref, b"", error)
        await self.send(handoff.host, MarketKind.HANDED_OFF, reply.blob)
        self._finish_early(offer)  # the guest is still here: checkpoint it as before

    async def _handed_off(self, offer: Offer, moved: SegmentMigrated) -> None:
        ref = offer.ref
        destination = self._handing.get(ref.digest)
        self._forget(ref)
        await self._execute(self.bidder.handle(ReplicaHandedOff(ref), time.time()))
        if destination is not None:
            node, live_ref = destination
            log.info(
                "segment %d handed off live to %s (downtime %.0f ms, libvirt)",
                ref.segment,
                node.short,
                moved.downtime_ms,
            )
            self.hand_offs.append(
                {
                    "job_id": ref.job_id.hex(),
                    "segment": ref.segment,
                    "to": str(node),
                    "at": time.time(),
                    "downtime_ms": moved.downtime_ms,
                    "cpu_s": round(moved.cpu_s, 3),
                }
            )
            reply = sign_handed_off(self.identity, live_ref, moved.console)
            await self.send(node, MarketKind.HANDED_OFF, reply.blob)

    # -- live hand-off: arriving -------------------------------------------------------

    async def _ask_for_guest(self, start: StartReplica) -> None:
        """We won a live move: ask its source to migrate the guest to us."""
        offer = start.offer
        assert offer.source is not None and self.migration is not None
        uri, address = self.migration
        try:
            spec = await self.segments.destination_spec(_order(offer, _grant_blob(start)))
        except SegmentError as exc:  # the image went missing: the adopt fails on its own
            log.warning("cannot ask for the guest of segment %d: %s", offer.ref.segment, exc)
            return
        award = decode_award(start.award_blob)
        handoff = sign_handoff(self.identity, offer, award, uri, address, spec)
        await self.send(offer.source, MarketKind.HANDOFF, handoff.blob)
        self.stats["handoffs_asked"] += 1

    async def _on_handed_off(self, sender: NodeId, blob: bytes) -> None:
        try:
            handed = decode_handed_off(blob)
        except RemoteProtocolError as exc:
            self.stats[f"refused_{refusal_of(exc).value}"] += 1
            return
        offer = self.offers.get(handed.ref.digest)
        if offer is None or offer.source != sender or handed.host != sender:
            self.stats["refused_mismatch"] += 1
            return
        name = f"gl-{_vm_name(offer)}"
        if handed.error:
            log.warning("%s could not send its guest: %s", sender.short, handed.error)
            self._adopting[offer.ref.digest] = handed.error
            cancel = self.running.get(offer.ref.digest)
            if cancel is not None:
                cancel.set()
            return
        assert self._nursery is not None  # a task: the frame's receive loop must not wait
        self._nursery.start_soon(guarded, self._give_console, offer, name, handed.console)

    async def _give_console(self, offer: Offer, name: str, console: bytes) -> None:
        """The adopting replica registers when its worker starts: wait for it a little."""
        for _ in range(PREFIX_TRIES):
            if name in self.segments.replicas or offer.ref.digest not in self.running:
                break
            await trio.sleep(PREFIX_RETRY_S)
        try:
            self.segments.set_console_prefix(name, console)
        except SegmentError as exc:  # no such replica (any more), or a second, other console
            self.stats["handed_off_refused"] += 1
            log.warning("the console for %s was not taken: %s", name, exc)
            return
        self.stats["guests_adopted"] += 1

    def guest_names(self) -> list[str]:
        """The libvirt domains of the replicas running here."""
        return [f"gl-{_vm_name(self.offers[d])}" for d in self.running if d in self.offers]

    def set_policy(self, policy: HostPolicy) -> None:
        self.bidder.policy = policy

    def view(self) -> dict[str, Any]:
        free = self.bidder.free()
        return {
            "statistics": dict(Counter(self.bidder.statistics()) + self.stats),
            "hand_offs": list(self.hand_offs),
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


def _order(
    offer: Offer, grant: bytes | None, sources: tuple[tuple[str, int], ...] = ()
) -> ReplicaOrder:
    """What the replica of `offer` runs: a live offer's guest is adopted, not restored;
    a job's own program takes its bundle and image from `sources`."""
    ref = offer.ref
    return ReplicaOrder(
        name=_vm_name(offer),
        segment=ref.segment,
        attempt=ref.attempt,
        image_id=offer.image,
        args=offer.args,
        vcpus=offer.requirements.vcpus,
        extent_cpu_s=float(offer.extent_s),
        memory_mib=offer.requirements.memory_mib,
        tap=market_tap_name(ref.job_id) if grant is not None else None,
        address=str(grant_address(grant)) if grant is not None else None,
        adopt=offer.source is not None,
        work=offer.work,
        work_holders=sources if offer.work is not None else (),
    )


def _vm_name(offer: Offer) -> str:
    """One domain name per job (see MARKET_VM in node/runtime/segment_service.py)."""
    return market_vm_name(offer.ref.job_id)


def _grant_blob(start: StartReplica) -> bytes | None:
    """The signed route grant a network job's award gave this host (None: no network)."""
    grant = start.award.grant
    return grant.blob if grant is not None and grant.blob else None
