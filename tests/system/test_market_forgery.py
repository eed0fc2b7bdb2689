"""Forged market and ledger statements against a real agent: refused, counted, harmless.

The issue's requirement: "Forged bids, awards, completions and commitments are
rejected and counted; the agent stays up". One agent (root namespace, loopback,
no overlay, no peers) owns a job of the demo image, so its offers reach nobody
and the job waits in ``offered``. A test node then sends it MARKET and LEDGER
frames that are valid as frames (signed by their sender, fresh seq) but carry
statements that are tampered, signed by the wrong key, aimed at offers that do
not exist, issued by an untrusted issuer, or garbage. Every frame declares the
one counter it must raise. They go in small batches, each followed by a PING
the agent must answer (frames are handled in order, so its ACK means the batch
was); then the test checks each counter rose by exactly what was sent, that
nothing else was refused, and that the job, the host side and the ledger are as
they were: no award, no bid, no chain, no payment.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from kit.agents import AgentProcess, ping, write_config
from kit.fuzzing import signed
from kit.paths import REPO_ROOT

from node.base.identity import Identity, NodeId
from node.base.wire import MessageType, encode_frame
from node.ledger.tokens import HashChain, Payment, sign_ack, sign_commitment, sign_payment
from node.market.message_fields import MarketKind, OfferRef
from node.market.offer_messages import (
    AWARD_CONTEXT,
    OFFER_CONTEXT,
    Capacity,
    Requirements,
    Winner,
    sign_award,
    sign_bid,
    sign_offer,
)
from node.market.outcome_messages import CancelReason, sign_cancel, sign_commit, sign_completion
from node.runtime.control import ControlError, call
from node.runtime.ledger_service import LedgerKind
from overlay.claims import sign_grant
from segments.image.store import BUSYBOX, build

RECIPE = REPO_ROOT / "deploy" / "recipes" / "demo.toml"
JOB = {
    "memory_mib": 128,
    "vcpus": 1,
    "extent_s": 2,
    "segments": 3,
    "redundancy": 2,
    "price_ceiling": 10,
}
# The job's history rows and machine counters that would mean a forgery got through.
DISTURBED_ROWS = {"awarded", "completion", "verified", "rejected", "committed", "paid", "finished"}
DISTURBED_STATS = ("awards", "bids_accepted", "completions", "verified", "commits")


@dataclass
class MarketAgent:
    process: AgentProcess
    sock: socket.socket
    address: tuple[str, int]
    node_id: NodeId
    swarm_id: str
    job_id: bytes
    image_id: str


@pytest.fixture(scope="module")
def market_agent(tmp_path_factory: pytest.TempPathFactory):
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb") and BUSYBOX.exists()):
        pytest.skip("building the demo image needs Debian's apt-get, dpkg-deb and busybox-static")
    base = tmp_path_factory.mktemp("forgery")
    image = build(RECIPE, base / "images")  # the kernel package is cached after the first build
    config = write_config(base / "agent.toml", base / "state", image_store=base / "images")
    agent = AgentProcess(config, base / "state", base / "agent.log")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        status = agent.start()
        sock.bind(("127.0.0.1", 0))
        host, port = status["listen"].rsplit(":", 1)
        job = call(agent.socket, "job_submit", {"job": {"image": image.id, **JOB}})
        yield MarketAgent(
            agent,
            sock,
            (host, int(port)),
            NodeId.parse(status["node_id"]),
            status["swarm_id"],
            bytes.fromhex(job["job_id"]),
            image.id,
        )
    finally:
        sock.close()
        agent.stop()


# -- forging ---------------------------------------------------------------------------


def tampered(blob: bytes) -> bytes:
    """The statement with one bit of its signature flipped."""
    payload, signature = msgpack.unpackb(blob)
    return msgpack.packb([payload, bytes([signature[0] ^ 1]) + signature[1:]])


def rewritten(blob: bytes, **fields: Any) -> bytes:
    """The statement with payload fields changed, under its original signature."""
    payload, signature = msgpack.unpackb(blob)
    changed = {**msgpack.unpackb(payload), **fields}
    return msgpack.packb([msgpack.packb(changed, use_bin_type=True), signature])


@dataclass
class Attack:
    """Frames for the agent, each with the one counter it must raise there."""

    sender: Identity = field(default_factory=Identity.generate)
    frames: list[bytes] = field(default_factory=list)
    expected: Counter[tuple[str, str]] = field(default_factory=Counter)
    _seq: int = 0

    def send(self, where: str, counter: str, msg_type: MessageType, kind: int, blob: bytes) -> None:
        self._seq += 1
        body = {"kind": int(kind), "blob": blob}
        self.frames.append(encode_frame(self.sender, msg_type, self._seq, body, sign=True))
        self.expected[(where, counter)] += 1

    def market(self, where: str, counter: str, kind: int, blob: bytes) -> None:
        self.send(where, counter, MessageType.MARKET, kind, blob)

    def ledger(self, where: str, counter: str, kind: int, blob: bytes) -> None:
        self.send(where, counter, MessageType.LEDGER, kind, blob)


def deliver(agent: MarketAgent, frames: list[bytes], batch: int = 8) -> None:
    """Send ``frames`` a batch at a time, each batch followed by a PING the agent must
    answer: frames are handled in order, so its ACK means the batch was (and no batch
    overflows the agent's socket buffer, which would drop frames uncounted)."""
    for start in range(0, len(frames), batch):
        for frame in frames[start : start + batch]:
            agent.sock.sendto(frame, agent.address)
        assert ping(agent.sock, agent.address, start + 1) == start + 1


def counters(agent: MarketAgent) -> dict[str, dict[str, int]]:
    """Every refusal counter, by where it is kept: the job's machine ("job"), the owner's
    adapter ("owner"), the host side ("host"), the ledger's cores and adapter."""
    socket_path = agent.process.socket
    market = call(socket_path, "market")
    ledger = call(socket_path, "ledger")
    job = call(socket_path, "job", {"job": agent.job_id.hex()})
    return {
        "job": job["statistics"],
        "owner": market["owner_statistics"],
        "host": market["statistics"],
        "payee": ledger["payee"]["statistics"],
        "payer": ledger["payer"]["statistics"],
        "ledger": ledger["statistics"],
    }


def refusals(stats: dict[str, dict[str, int]]) -> Counter[tuple[str, str]]:
    return Counter(
        {
            (where, name): value
            for where, table in stats.items()
            for name, value in table.items()
            if name.startswith("refused_") or name == "frames_unexpected"
        }
    )


def bids_and_completions(attack: Attack, agent: MarketAgent, ref: OfferRef) -> None:
    """(1) tampered and impersonated bids, (2) a bid for an offer never made, (3) completions."""
    host, victim = Identity.generate(), Identity.generate()
    bid = sign_bid(
        host, ref, price=1, finish_s=10, held_bytes=0, capacity=Capacity(4, 4096, 10_240, 2)
    )
    attack.market("job", "refused_bad_signature", MarketKind.BID, tampered(bid.blob))
    attack.market("job", "refused_bad_signature", MarketKind.BID, rewritten(bid.blob, price=2))
    impersonated = rewritten(bid.blob, host=victim.node_id.key)
    attack.market("job", "refused_bad_signature", MarketKind.BID, impersonated)
    # Well signed, the right job, segment and attempt: but no such offer was ever signed.
    attack.market("job", "refused_stale", MarketKind.BID, bid.blob)
    elsewhere = OfferRef(os.urandom(32), 0, 1, os.urandom(32))
    other_job = sign_bid(
        host, elsewhere, price=1, finish_s=10, held_bytes=0, capacity=Capacity(4, 4096, 10_240, 2)
    )
    attack.market("owner", "refused_unknown_job", MarketKind.BID, other_job.blob)

    completion = sign_completion(
        host, ref, manifest=os.urandom(32), size=1 << 20, progress=os.urandom(32), cpu_ms=2000
    )
    kind = MarketKind.COMPLETION
    attack.market("job", "refused_bad_signature", kind, tampered(completion.blob))
    changed = rewritten(completion.blob, manifest=os.urandom(32))
    attack.market("job", "refused_bad_signature", kind, changed)
    impersonated = rewritten(completion.blob, host=victim.node_id.key)
    attack.market("job", "refused_bad_signature", kind, impersonated)
    attack.market("job", "refused_stale", kind, completion.blob)  # never awarded, no such offer


def host_statements(attack: Attack, agent: MarketAgent, ref: OfferRef) -> None:
    """(4) awards, cancels and commits to the agent as a host: it never bid on anything."""
    stranger, me = Identity.generate(), agent.node_id
    award = sign_award(stranger, ref, (Winner(me, 1),))
    attack.market("host", "refused_unknown_offer", MarketKind.AWARD, award.blob)
    attack.market("host", "refused_bad_signature", MarketKind.AWARD, tampered(award.blob))
    as_owner = rewritten(award.blob, owner=me.key)  # "signed" by the job's real owner
    attack.market("host", "refused_bad_signature", MarketKind.AWARD, as_owner)
    grant = sign_grant(
        stranger,
        swarm_id=agent.swarm_id,
        job_nonce=os.urandom(16),  # the stranger's own job, not the one the award names
        node_id=me,
        epoch=1,
        expires=int(time.time()) + 3600,
    )
    fields = {
        "owner": stranger.node_id.key,
        "job": ref.job_id,
        "segment": ref.segment,
        "attempt": ref.attempt,
        "offer": ref.digest,
        "winners": [[me.key, 1, 1, grant.blob]],
    }
    bad_grant = signed(stranger, AWARD_CONTEXT, fields)
    attack.market("host", "refused_bad_grant", MarketKind.AWARD, bad_grant)

    cancel = sign_cancel(stranger, ref, (me,), CancelReason.LOST_RACE)
    attack.market("host", "refused_unknown_offer", MarketKind.CANCEL, cancel.blob)
    attack.market("host", "refused_bad_signature", MarketKind.CANCEL, tampered(cancel.blob))
    commit = sign_commit(
        stranger, ref, winner=me, manifest=os.urandom(32), size=1 << 20, holders=(me,)
    )
    attack.market("host", "refused_unknown_offer", MarketKind.COMMIT, commit.blob)
    attack.market("host", "refused_bad_signature", MarketKind.COMMIT, tampered(commit.blob))

    # Offers: a stranger's offer naming the agent's job id, and one "by" the agent itself.
    offer = sign_offer(
        stranger,
        job_nonce=os.urandom(16),
        segment=0,
        attempt=1,
        image=agent.image_id,
        requirements=Requirements(128, 1),
        extent_s=2,
        checkpoint=None,
        checkpoint_size=0,
        holders=(),
        k=1,
        ceiling=10,
        bid_deadline=int(time.time()) + 3600,
    )  # valid as signed (the agent has the image and would bid): never sent as is
    payload = {**msgpack.unpackb(msgpack.unpackb(offer.blob)[0]), "job": agent.job_id}
    hijacked = signed(stranger, OFFER_CONTEXT, payload)
    attack.market("host", "refused_job_mismatch", MarketKind.OFFER, hijacked)
    attack.market("host", "refused_bad_signature", MarketKind.OFFER, tampered(offer.blob))
    as_owner = rewritten(offer.blob, owner=me.key, job=agent.job_id)
    attack.market("host", "refused_bad_signature", MarketKind.OFFER, as_owner)


def ledger_statements(attack: Attack, agent: MarketAgent) -> None:
    """(5) payments and commitments: forged signatures, an untrusted issuer, no chain."""
    payer, issuer, me = Identity.generate(), Identity.generate(), agent.node_id
    expires = int(time.time()) + 3600
    chain = HashChain(os.urandom(32), 16)
    # Self-issued (which a volunteer swarm accepts): valid as signed, so never sent as is.
    own = sign_commitment(
        payer, chain, payer=payer.node_id, payee=me, unit_value=1, expires=expires
    )
    kind = LedgerKind.COMMITMENT
    attack.ledger("payee", "refused_bad_signature", kind, tampered(own.blob))
    attack.ledger("payee", "refused_bad_signature", kind, rewritten(own.blob, unit=1000))
    untrusted_chain = HashChain(os.urandom(32), 16)
    untrusted = sign_commitment(
        issuer, untrusted_chain, payer=payer.node_id, payee=me, unit_value=1, expires=expires
    )
    attack.ledger("payee", "refused_untrusted_issuer", kind, untrusted.blob)

    def payment(on: HashChain, commitment: bytes | None) -> bytes:
        job = agent.job_id
        made = sign_payment(
            payer, on, payee=me, job_id=job, segment=0, index=1, units=1, commitment=commitment
        )
        return made.blob

    kind = LedgerKind.PAYMENT
    valid = payment(chain, own.blob)  # would be accepted: only its forgeries are sent
    attack.ledger("payee", "refused_bad_signature", kind, tampered(valid))
    attack.ledger("payee", "refused_bad_signature", kind, rewritten(valid, segment=1))
    forged_inside = payment(chain, tampered(own.blob))  # a good payment, a forged commitment
    attack.ledger("payee", "refused_bad_signature", kind, forged_inside)
    attack.ledger(
        "payee", "refused_untrusted_issuer", kind, payment(untrusted_chain, untrusted.blob)
    )
    attack.ledger(
        "payee", "refused_unknown_chain", kind, payment(HashChain(os.urandom(32), 16), None)
    )

    # Acks to the agent as a payer: it never paid anyone.
    never_sent = Payment(
        chain.chain_id, me, payer.node_id, agent.job_id, 0, 1, 1, chain.token(1)
    )  # "the agent paid the stranger", which it did not
    ack = sign_ack(payer, never_sent)
    attack.ledger("payer", "refused_unknown_chain", LedgerKind.ACK, ack.blob)
    attack.ledger("payer", "refused_bad_signature", LedgerKind.ACK, tampered(ack.blob))


def garbage(attack: Attack, agent: MarketAgent) -> None:
    """(6) garbage of every MARKET and LEDGER kind, and kinds nobody knows."""
    blobs = [
        b"",
        b"\xc1",  # never valid msgpack
        os.urandom(300),
        msgpack.packb([1, 2]),
        msgpack.packb({"job": agent.job_id}),  # not [payload, signature]
        b"\x92\xc4\x01x\xc4\x40" + bytes(64),  # a payload that is not a map
        bytes(11_000),  # over every statement's size limit
    ]
    # Routed by its job id to the job's own machine, which then finds no author.
    named = msgpack.packb([msgpack.packb({"job": agent.job_id}), bytes(64)])
    to_owner = (MarketKind.BID, MarketKind.COMPLETION, MarketKind.WITHDRAW)
    for kind in MarketKind:
        for blob in blobs:
            where = "owner" if kind in to_owner else "host"
            attack.market(where, "refused_malformed", kind, blob)
        where = "job" if kind in to_owner else "host"
        attack.market(where, "refused_malformed", kind, named)
    for kind in LedgerKind:
        for blob in [*blobs, named]:
            attack.ledger(
                "payer" if kind is LedgerKind.ACK else "payee", "refused_malformed", kind, blob
            )
    for unknown in (0, 10, 99, -1, 1 << 40):
        attack.market("host", "frames_unexpected", unknown, named)
    for unknown in (0, 4, 99, -1, 1 << 40):
        attack.ledger("ledger", "frames_unexpected", unknown, named)


# -- the tests -------------------------------------------------------------------------


def test_forged_statements_are_refused_counted_and_change_nothing(market_agent: MarketAgent):
    agent = market_agent
    socket_path = agent.process.socket
    job_before = call(socket_path, "job", {"job": agent.job_id.hex()})
    assert job_before["state"] == "offered" and job_before["segment"] == 0
    host_before = call(socket_path, "market")
    status_before = agent.process.status()
    before = counters(agent)

    # The offer the agent has out now: its segment and attempt, and a digest it never signed.
    ref = OfferRef(agent.job_id, job_before["segment"], job_before["attempt"], os.urandom(32))
    attack = Attack()
    bids_and_completions(attack, agent, ref)
    host_statements(attack, agent, ref)
    ledger_statements(attack, agent)
    garbage(attack, agent)
    deliver(agent, attack.frames)

    after = counters(agent)
    rose = refusals(after) - refusals(before)
    for (where, counter), count in sorted(attack.expected.items()):
        assert rose[(where, counter)] == count, (where, counter, after[where])
    assert rose == attack.expected  # each forgery counted once, under its own reason

    status = agent.process.status()
    assert agent.process.process is not None and agent.process.process.poll() is None
    assert status["frames_in"] >= status_before["frames_in"] + len(attack.frames)
    assert status["protocol_errors"] == status_before["protocol_errors"]  # all reached the market

    job = call(socket_path, "job", {"job": agent.job_id.hex()})  # the job: as it was
    assert (job["state"], job["segment"], job["committed"]) == ("offered", 0, 0)
    assert job["paid_units"] == 0 and job["outcome"] is None
    assert not [row for row in job["history"] if row["what"] in DISTURBED_ROWS]
    assert all(job["statistics"].get(name, 0) == 0 for name in DISTURBED_STATS)

    host = call(socket_path, "market")  # the host side: no bid, no reservation, no replica
    assert host["commitments"] == [] and host["free"] == host_before["free"]
    for name in ("bids", "awards_won", "cancels", "commits", "replicas_finished"):
        assert host["statistics"].get(name, 0) == 0, name

    ledger = call(socket_path, "ledger")  # the ledger: nothing accepted, nothing paid
    payee, payer = ledger["payee"], ledger["payer"]
    for name in ("commitments_accepted", "payments_accepted", "units_accepted", "chains"):
        assert payee["statistics"][name] == 0, name
    assert payee["chains"] == payee["payments"] == payee["balances"] == []
    assert payer["chains"] == payer["payments"] == payer["balances"] == []
    assert "Traceback" not in agent.process.log.read_text()


DROP = object()  # remove the key from the good job


def submit(**changes: Any) -> Callable[[MarketAgent], dict[str, Any]]:
    """job_submit params: the good job with ``changes`` (DROP removes a key)."""

    def params(agent: MarketAgent) -> dict[str, Any]:
        job = {"image": agent.image_id, **JOB, **changes}
        return {"job": {k: v for k, v in job.items() if v is not DROP}}

    return params


def given(params: dict[str, Any]) -> Callable[[MarketAgent], dict[str, Any]]:
    return lambda agent: params


NOBODY = "0" * 64  # a job id the agent does not own
BAD_MARKET_REQUESTS = [
    ("job_submit", given({}), "parameter 'job'"),
    ("job_submit", given({"job": "demo.toml"}), "parameter 'job'"),
    ("job_submit", given({"job": {b"image": "x"}}), "parameter 'job'"),  # a binary key
    ("job_submit", submit(memory_mib=16), "memory_mib: "),
    ("job_submit", submit(vcpus="two"), "vcpus: "),
    ("job_submit", submit(extent_s=0), "extent_s: "),
    ("job_submit", submit(segments=0), "segments: "),
    ("job_submit", submit(redundancy=0), "k: "),  # JobSpec's name for it (test_jobs.py)
    ("job_submit", submit(price_ceiling=1 << 30), "ceiling: "),
    ("job_submit", submit(deadline=1), "deadline: "),
    ("job_submit", submit(network="yes"), "network: "),
    ("job_submit", submit(surprise=1), "unknown job key(s): surprise"),
    ("job_submit", submit(image=DROP), "lacks key(s): image"),
    ("job_submit", submit(image=NOBODY), f"image: no image {NOBODY}"),
    ("job_submit", submit(image="../../etc/passwd"), "image: not an image id"),
    ("job", given({}), "'job'"),
    ("job", given({"job": 7}), "'job'"),
    ("job", given({"job": NOBODY}), NOBODY),
    ("job", given({"job": "not hex"}), "not hex"),
    ("job_output", given({}), "'job'"),
    ("job_output", given({"job": NOBODY}), NOBODY),
]


@pytest.mark.parametrize(("method", "params", "names"), BAD_MARKET_REQUESTS)
def test_bad_market_requests_get_one_clear_error_and_the_agent_stays_up(
    market_agent: MarketAgent, method: str, params: Callable, names: str
):
    agent = market_agent
    jobs_before = [job["job_id"] for job in call(agent.process.socket, "jobs")]
    with pytest.raises(ControlError) as info:
        call(agent.process.socket, method, params(agent))
    message = str(info.value)
    assert message and "\n" not in message
    assert not message.startswith("internal error"), message  # an RpcError, not a crash
    assert names in message
    jobs = [job["job_id"] for job in call(agent.process.socket, "jobs")]
    assert jobs == jobs_before  # no job half-submitted
    assert agent.process.status()["node_id"]
    assert agent.process.process is not None and agent.process.process.poll() is None
    assert "Traceback" not in agent.process.log.read_text()
