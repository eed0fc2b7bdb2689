"""A job owner's own program in the market: the job file's keys, the offer's work, the bids."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
from kit.fuzzing import signed
from kit.market import MIB, NONCE, NOW

from node.base.identity import Identity
from node.base.wire import RemoteProtocolError
from node.market.bidder import Bidder, HostPolicy, OfferReceived, disk_need_mib
from node.market.job_records import decode_spec, encode_spec
from node.market.jobs import JobSpec, JobSpecError
from node.market.messages import SendStatement
from node.market.offer_messages import (
    OFFER_CONTEXT,
    Requirements,
    Work,
    decode_bid,
    decode_offer,
    sign_offer,
)
from node.market.run_requests import RunRequest, split_request, wants_run
from overlay.claims import derive_job_id

OWNER = Identity.from_seeds(b"\x41" * 32, b"\x42" * 32)
HOST = Identity.from_seeds(b"\x43" * 32, b"\x44" * 32)
WORK = Work(bundle=b"b" * 32, bundle_bytes=50 * MIB, disk_mib=1024, output_mib=64)


def offer(**over: Any):
    fields: dict[str, Any] = {
        "job_nonce": NONCE,
        "segment": 0,
        "attempt": 1,
        "image": "run",
        "requirements": Requirements(memory_mib=128, vcpus=1),
        "extent_s": 10,
        "checkpoint": None,
        "checkpoint_size": 0,
        "holders": (),
        "k": 2,
        "ceiling": 10,
        "bid_deadline": NOW + 3,
        "work": WORK,
    }
    return sign_offer(OWNER, **(fields | over))


def test_an_offer_carries_its_work_and_counts_the_bundle_in_what_a_host_fetches():
    made = offer(checkpoint=b"c" * 32, checkpoint_size=5 * MIB)
    assert decode_offer(made.blob).work == WORK
    assert made.fetch_bytes == 55 * MIB
    assert offer(work=None).work is None and offer(work=None).fetch_bytes == 0


@pytest.mark.parametrize(
    "row",
    [
        [b"short", 0, 16, 16],
        [b"b" * 32, -1, 16, 16],
        [b"b" * 32, 2**41 + 1, 16, 16],
        [b"b" * 32, 0, 15, 16],  # under the smallest disk
        [b"b" * 32, 0, 16, (1 << 20) + 1],  # over the largest
        [b"b" * 32, 0, True, 16],
        [b"b" * 32, 0, 16],
        {"bundle": b"b" * 32},
    ],
)
def test_an_offer_s_bad_work_is_refused_where_it_is_decoded(row):
    fields = {
        "owner": OWNER.node_id.key,
        "nonce": NONCE,
        "job": derive_job_id(OWNER.node_id.key, NONCE),
        "segment": 0,
        "attempt": 1,
        "image": "run",
        "args": "",
        "memory": 128,
        "vcpus": 1,
        "arch": "x86_64",
        "kvm": False,
        "network": False,
        "extent": 10,
        "checkpoint": None,
        "size": 0,
        "holders": [],
        "k": 2,
        "ceiling": 10,
        "deadline": NOW,
    }
    assert decode_offer(signed(OWNER, OFFER_CONTEXT, fields)).work is None
    with pytest.raises(RemoteProtocolError, match="work"):
        decode_offer(signed(OWNER, OFFER_CONTEXT, fields | {"work": row}))


def test_a_bid_reserves_the_bundle_and_both_disks_and_estimates_the_fetch():
    policy = HostPolicy(vcpus=4, memory_mib=4096, disk_mib=1400, replicas=2, setup_s=0)
    made = offer()
    assert disk_need_mib(made) == 128 + 50 + 1024 + 64
    bidder = Bidder(HOST, policy)
    effects = bidder.handle(OfferReceived(made.blob, held_bytes=20 * MIB), NOW)
    [bid] = [decode_bid(e.blob) for e in effects if isinstance(e, SendStatement)]
    assert bid.held_bytes == 20 * MIB
    assert bid.finish_s == math.ceil(30 * MIB / policy.bandwidth_bytes_s + 10)
    assert bid.capacity.disk_mib == 1400  # before this bid's own reservation
    too_big = offer(attempt=2, work=replace(WORK, disk_mib=2048))
    assert Bidder(HOST, policy).handle(OfferReceived(too_big.blob), NOW) == []


def spec(**over: Any) -> JobSpec:
    fields: dict[str, Any] = dict(
        owner=OWNER.node_id,
        nonce=NONCE,
        image="run",
        memory_mib=128,
        vcpus=1,
        extent_s=3,
        segments=None,
        k=2,
        ceiling=10,
        deadline=2_000_000_000,
        work=WORK,
    )
    return JobSpec(**(fields | over))


def test_a_job_with_work_is_stored_and_read_back_whole():
    assert decode_spec(encode_spec(spec())) == spec()
    assert decode_spec(encode_spec(spec(work=None))).work is None


@pytest.mark.parametrize(
    ("work", "field"),
    [
        (replace(WORK, bundle=b"x"), "work"),
        (replace(WORK, disk_mib=1 << 21), "disk_mib"),
        (replace(WORK, output_mib=8), "output_mib"),
        (replace(WORK, bundle_bytes=-1), "bundle_bytes"),
    ],
)
def test_a_job_s_work_is_checked_when_the_spec_is_made(work, field):
    with pytest.raises(JobSpecError, match=field):
        spec(work=work)


def test_the_job_file_s_program_keys_are_split_from_the_job_s():
    table = {
        "image": "tools:1",
        "command": ["python3", "/app/count.py"],
        "env": {"LANG": "C.UTF-8"},
        "workdir": "/app",
        "inputs": {"numbers.txt": "/home/me/numbers.txt", "data/a.csv": "/tmp/a.csv"},
        "disk_mib": 512,
        "output_mib": 32,
        "memory_mib": 256,
        "redundancy": 2,
    }
    assert wants_run(table) and not wants_run({"image": "x", "memory_mib": 96})
    rest, request = split_request(table)
    assert rest == {"image": "tools:1", "memory_mib": 256, "redundancy": 2}
    assert request == RunRequest(
        image="tools:1",
        command=("python3", "/app/count.py"),
        env=("LANG=C.UTF-8",),
        working_dir="/app",
        inputs={"numbers.txt": "/home/me/numbers.txt", "data/a.csv": "/tmp/a.csv"},
        disk_mib=512,
        output_mib=32,
    )


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"inputs": {"../etc/passwd": "/tmp/x"}}, "inputs"),
        ({"inputs": {"/abs": "/tmp/x"}}, "inputs"),
        ({"inputs": {"ok": "relative/path"}}, "inputs"),
        ({"inputs": ["a", "b"]}, "inputs"),
        ({"command": []}, "command"),
        ({"command": ["a\x00b"]}, "command"),
        ({"command": [1]}, "command"),
        ({"env": ["NOEQUALS"]}, "env"),
        ({"workdir": "relative"}, "workdir"),
        ({"disk_mib": 1 << 21}, "disk_mib"),
        ({"disk_mib": 8}, "disk_mib"),
        ({"output_mib": "64"}, "output_mib"),
        ({"image": ""}, "image"),
        ({"boot": 5}, "boot"),
    ],
)
def test_bad_program_keys_are_refused_naming_the_field(over, field):
    with pytest.raises(JobSpecError, match=f"^{field}:"):
        split_request({"image": "tools:1", **over})


def test_unknown_keys_stay_for_the_job_spec_to_refuse():
    rest, _ = split_request({"image": "tools:1", "commmand": ["typo"]})
    with pytest.raises(JobSpecError, match=r"unknown job key.*commmand"):
        JobSpec.from_mapping(OWNER.node_id, NONCE, rest)
