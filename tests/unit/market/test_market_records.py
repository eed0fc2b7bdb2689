"""The owner's stored jobs and the ledgers' journals: records, state rows, ledger service."""

from __future__ import annotations

import functools

import msgpack
import pytest
import trio
import trio.testing

from node.base.identity import Identity
from node.ledger.payee import PayeeConfig
from node.market.job_records import (
    JobRecordError,
    decode_snapshot,
    decode_spec,
    encode_snapshot,
    encode_spec,
)
from node.market.jobs import JobSnapshot, JobSpec
from node.runtime.ledger_service import LedgerKind, LedgerService
from node.runtime.state import State
from segments.image.store import load
from segments.vm.runtime import LibvirtRuntime

OWNER = Identity.from_seeds(b"\x01" * 32, b"\x02" * 32)
HOST = Identity.from_seeds(b"\x03" * 32, b"\x04" * 32)


def spec(**over) -> JobSpec:
    fields = dict(
        owner=OWNER.node_id,
        nonce=b"n" * 16,
        image="img",
        memory_mib=96,
        vcpus=1,
        extent_s=3,
        segments=5,
        k=2,
        ceiling=10,
        deadline=2_000_000_000,
        args="gleaner.steps=100",
    )
    fields.update(over)
    return JobSpec(**fields)


@pytest.mark.parametrize("segments", [5, None])
def test_spec_round_trips(segments):
    original = spec(segments=segments)
    assert decode_spec(encode_spec(original)) == original


def test_snapshot_round_trips():
    snap = JobSnapshot(
        segment=3,
        manifest=b"m" * 32,
        size=123,
        holders=(HOST.node_id, OWNER.node_id),
        next_attempt=5,
        next_epoch=2,
        last_winner=HOST.node_id,
        last_price=7,
    )
    assert decode_snapshot(encode_snapshot(snap)) == snap
    assert decode_snapshot(encode_snapshot(JobSnapshot())) == JobSnapshot()


@pytest.mark.parametrize(
    "blob",
    [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"owner": b"short"})],
)
def test_corrupt_rows_get_a_clear_error(blob):
    with pytest.raises(JobRecordError):
        decode_spec(blob)
    with pytest.raises(JobRecordError):
        decode_snapshot(blob)


def test_job_rows_history_and_journal_survive_reopen(tmp_path):
    state = State(tmp_path / "state.db")
    job_id = spec().job_id
    state.add_job(job_id, encode_spec(spec()), 10.0)
    state.save_job_snapshot(job_id, encode_snapshot(JobSnapshot()))
    state.append_job_history(job_id, b"one")
    state.append_job_history(job_id, b"two")
    state.append_journal("payer", 1, b"a")
    state.append_journal("payer", 2, b"b")
    state.append_journal("payee", 1, b"c")
    state.end_job(job_id, "completed")
    state.close()
    again = State(tmp_path / "state.db")
    [(stored_id, stored_spec, snap, submitted, outcome)] = again.jobs()
    assert (stored_id, submitted, outcome) == (job_id, 10.0, "completed")
    assert decode_spec(stored_spec) == spec() and snap is not None
    assert again.job_history(job_id) == [b"one", b"two"]
    assert again.journal("payer") == [b"a", b"b"] and again.journal("payee") == [b"c"]
    with pytest.raises(Exception, match="UNIQUE"):
        again.append_journal("payer", 2, b"again")  # an entry is written once
    again.close()


class Wire:
    """Delivers LEDGER frames between two services in memory, recording them."""

    def __init__(self) -> None:
        self.services: dict = {}
        self.frames: list[tuple[LedgerKind, bytes]] = []
        self.queue: list = []

    def sender(self, me: Identity):
        async def send(target, kind, blob):
            self.frames.append((kind, blob))
            self.queue.append((target, me.node_id, kind, blob))

        return send

    async def flush(self) -> None:
        while self.queue:
            target, sender, kind, blob = self.queue.pop(0)
            await self.services[target].deliver(sender, kind, blob)


def service(tmp_path, name: str, me: Identity, wire: Wire) -> LedgerService:
    state = State(tmp_path / f"{name}.db")
    config = PayeeConfig(accept_self_issued=True)
    svc = LedgerService(me, state, wire.sender(me), chain_length=64, payee_config=config)
    wire.services[me.node_id] = svc
    return svc


def test_ledger_service_pays_journals_and_restores(tmp_path):
    async def main() -> None:
        wire = Wire()
        payer = service(tmp_path, "owner", OWNER, wire)
        payee = service(tmp_path, "host", HOST, wire)
        await payer.pay(b"j" * 32, 0, HOST.node_id, 5)  # opens a chain, then pays from it
        await wire.flush()
        assert [p["units"] for p in payee.view()["payee"]["payments"]] == [5]
        await payer.pay(b"j" * 32, 0, HOST.node_id, 5)  # asked twice: paid once
        await payer.pay(b"j" * 32, 1, HOST.node_id, 3)
        await wire.flush()
        assert payer.payer.statistics()["refused_duplicate_payment"] == 1
        view = payee.view()["payee"]
        assert [p["units"] for p in view["payments"]] == [5, 3]
        assert all(p["state"] == "accepted" for p in view["payments"])
        assert payer.view()["payer"]["balances"][0]["released"] == 8
        kinds = [kind for kind, _ in wire.frames]
        assert kinds.count(LedgerKind.PAYMENT) == 2 and kinds.count(LedgerKind.ACK) == 2
        # Restart both from their journals: nothing is paid or accepted twice.
        restored_payee = LedgerService(
            HOST,
            payee.state,
            wire.sender(HOST),
            chain_length=64,
            payee_config=PayeeConfig(accept_self_issued=True),
        )
        await restored_payee.restore()
        wire.services[HOST.node_id] = restored_payee
        for kind, blob in list(wire.frames):
            if kind == LedgerKind.PAYMENT:
                await restored_payee.deliver(OWNER.node_id, kind, blob)  # replays
        accepted = restored_payee.view()["payee"]["payments"]
        assert [p["units"] for p in accepted] == [5, 3]
        assert restored_payee.payee.statistics()["payments_accepted"] == 0

    trio.run(main)


def test_forged_and_unknown_ledger_frames_are_counted_not_fatal(tmp_path):
    async def main() -> None:
        wire = Wire()
        payee = service(tmp_path, "host", HOST, wire)
        await payee.deliver(OWNER.node_id, LedgerKind.PAYMENT, b"\x92\xc4\x01x\xc4\x40" + bytes(64))
        await payee.deliver(OWNER.node_id, 99, b"whatever")
        stats = payee.view()["payee"]["statistics"]
        assert sum(v for k, v in stats.items() if k.startswith("refused_")) == 1
        assert payee.view()["statistics"] == {"frames_unexpected": 1} and wire.frames == []

    trio.run(main)


def test_an_unreadable_stored_job_is_skipped_counted_and_kept(tmp_path):
    from node.market.segment_rounds import machine_config
    from node.runtime.market_owner import OwnerMarket
    from node.runtime.segment_service import SegmentService

    state = State(tmp_path / "state.db")
    good = spec()
    state.add_job(good.job_id, encode_spec(good), 1.0)
    state.add_job(b"x" * 32, b"\xc1 not a spec", 2.0)  # a corrupt row
    other = spec(nonce=b"m" * 16)
    state.add_job(other.job_id, encode_spec(other), 3.0)
    state.append_job_history(other.job_id, b"\xc1")  # its history is corrupt

    async def main() -> None:
        segments = SegmentService(
            OWNER,
            tmp_path,
            tmp_path / "images",
            functools.partial(LibvirtRuntime, "test:///default"),
            load,
        )

        async def nowhere(*_args) -> None:
            raise AssertionError("nothing is sent for a job restored as finished")

        owner = OwnerMarket(
            OWNER, state, segments, machine_config("s", 1.0, 60.0), nowhere, nowhere,
            lambda: [], lambda node: None, 10.0,
        )  # fmt: skip
        state.end_job(good.job_id, "completed")  # finished: restored, not resumed
        async with trio.open_nursery() as nursery:
            await nursery.start(owner.run)
            assert list(owner.jobs) == [good.job_id]
            assert owner.statistics()["jobs_unreadable"] == 2
            nursery.cancel_scope.cancel()
        segments.close()

    trio.run(main)
    assert len(state.jobs()) == 3, "nothing deleted"
    state.close()


def test_a_verifier_failure_of_our_own_is_retried_not_blamed_on_the_replica(tmp_path):
    from types import SimpleNamespace

    from node.market.jobs import VerifyCompletion
    from node.market.segment_rounds import machine_config
    from node.runtime.market_owner import VERIFY_TRIES, OwnerMarket
    from node.runtime.segment_service import VerifierUnavailable

    state = State(tmp_path / "state.db")
    job = spec()
    state.add_job(job.job_id, encode_spec(job), 1.0)

    class Segments:
        """A segment service twin whose verifier fails `failures` times, then verifies."""

        def __init__(self, failures: int) -> None:
            self.failures, self.calls = failures, 0

        async def verify_completion(self, *_args):
            self.calls += 1
            if self.calls <= self.failures:
                raise VerifierUnavailable("verifier: libvirtd is not answering")
            return SimpleNamespace(ok=True, reason="the guest took step 8")

    async def nowhere(*_args) -> None:
        return None

    async def verify(failures: int) -> tuple[OwnerMarket, list]:
        owner = OwnerMarket(
            OWNER, state, Segments(failures), machine_config("s", 1.0, 60.0), nowhere, nowhere,
            lambda: [], lambda node: None, 10.0,
        )  # fmt: skip
        owner._add(job, None, 1.0, None)

        async def fetched(*_args):
            return object()

        owner._fetch_checkpoint = fetched  # type: ignore[method-assign]
        effect = VerifyCompletion(job.job_id, 0, HOST.node_id, b"m" * 32, b"p" * 32, None, False)
        await owner._verify(job.job_id, effect)
        return owner, [r["what"] for r in owner.jobs[job.job_id].history]

    async def main() -> None:
        owner, rows = await verify(VERIFY_TRIES - 1)
        assert rows == ["verified"], "judged only after the verifier worked"
        assert owner.statistics()["verifier_unavailable"] == VERIFY_TRIES - 1
        owner, rows = await verify(VERIFY_TRIES)
        assert rows == ["rejected"], "it cannot wait for ever: after the last try it rejects"

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    state.close()
