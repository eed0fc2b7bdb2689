"""The agent as a real process: bad config, crash recovery, clean stop, garbage frames."""

from __future__ import annotations

import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit.agents import AgentProcess, ping, write_config
from kit.fuzzing import edit_lists, mutate, valid_frames

from node.base.identity import Identity
from node.base.wire import MessageType, encode_frame


def gleaner(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=60
    )


def test_broken_config_exits_with_one_line_naming_the_field(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[network]\nlisten = "not-an-address"\n')
    result = gleaner("agent", "--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "network.listen" in lines[0]
    assert "Traceback" not in result.stderr


def test_unparsable_config_is_one_line_too(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[network\nlisten=")
    result = gleaner("agent", "--config", str(path))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_status_without_agent_is_one_clear_line(tmp_path):
    result = gleaner("status", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"gleaner: no agent control socket at {tmp_path / 'none.sock'} (is the agent running?)"
    ]


def test_kill_9_then_restart_keeps_identity_and_state(root_agent: AgentProcess):
    first = root_agent.start()
    assert first["boot"] == 1
    assert root_agent.kill(signal.SIGKILL) == -signal.SIGKILL
    second = root_agent.start()
    assert second["node_id"] == first["node_id"]
    assert second["boot"] == 2
    assert second["record_seq"] > first["record_seq"]
    db = sqlite3.connect(root_agent.state_dir / "state.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()


def test_sigterm_stops_cleanly(root_agent: AgentProcess):
    root_agent.start()
    assert root_agent.kill(signal.SIGTERM) == 0
    assert not root_agent.socket.exists()
    assert "stopped" in root_agent.log.read_text()


def test_status_table_and_json(root_agent: AgentProcess):
    status = root_agent.start()
    table = gleaner("status", "--socket", str(root_agent.socket))
    assert table.returncode == 0
    assert status["node_id"] in table.stdout and "uptime" in table.stdout
    as_json = gleaner("status", "--socket", str(root_agent.socket), "--json")
    import json

    parsed = json.loads(as_json.stdout)
    assert parsed["node_id"] == status["node_id"]
    assert parsed["listen"].startswith("127.0.0.1:")


def test_control_socket_is_private(root_agent: AgentProcess):
    root_agent.start()
    assert root_agent.socket.stat().st_mode & 0o077 == 0


@pytest.fixture(scope="module")
def fuzzed_agent(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzzed")
    config = write_config(base / "agent.toml", base / "state")
    agent = AgentProcess(config, base / "state", base / "agent.log")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        status = agent.start()
        host, port = status["listen"].rsplit(":", 1)
        sock.bind(("127.0.0.1", 0))
        yield agent, sock, (host, int(port))
    finally:
        sock.close()
        agent.stop()


FRAME_SENDER = Identity.from_seeds(bytes(range(32)), bytes(range(1, 33)))
FRAMES = st.one_of(
    st.binary(max_size=1500),
    st.builds(
        mutate,
        st.sampled_from(valid_frames(FRAME_SENDER)),
        edit_lists(max_position=5000, max_size=6),
    ),
)


def test_agent_survives_garbage_over_its_socket(fuzzed_agent):
    agent, sock, address = fuzzed_agent
    errors_before = agent.status()["protocol_errors"]

    @settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
    @given(FRAMES)
    def send(frame: bytes) -> None:
        sock.sendto(frame, address)
        assert agent.process is not None and agent.process.poll() is None  # still running

    send()
    # the frames reached the agent (not some other address), and it still answers after
    # the last of them
    assert ping(sock, address, random.randrange(1 << 30))
    assert agent.status()["protocol_errors"] - errors_before > 100


def send_garbage(sock: socket.socket, address: tuple[str, int], count: int, seed: int) -> None:
    """`count` frames of random bytes (none decodes), in batches the agent must ACK between,
    so none is dropped from a full socket buffer uncounted."""
    rng = random.Random(seed)
    for start in range(0, count, 25):
        for _ in range(min(25, count - start)):
            sock.sendto(b"\xff" + rng.randbytes(rng.randrange(0, 1500)), address)
        assert ping(sock, address, start + 1) == start + 1


def test_fuzzed_agent_still_answers(fuzzed_agent):
    """Whether or not the fuzz test ran first on this agent: garbage of its own, then checks."""
    agent, sock, address = fuzzed_agent
    before = agent.status()["protocol_errors"]
    send_garbage(sock, address, 150, seed=13)
    assert ping(sock, address, random.randrange(1 << 30))  # answers on its socket
    status = agent.status()
    assert status["protocol_errors"] >= before + 150
    assert status["frames_in"] > status["protocol_errors"]
    result = gleaner("status", "--socket", str(agent.socket), "--json")
    assert result.returncode == 0, result.stderr
    assert agent.process is not None and agent.process.poll() is None


def test_record_message_is_verified_and_persisted(fuzzed_agent):
    agent, sock, address = fuzzed_agent
    from node.base.records import Capabilities, sign_record

    other = Identity.generate()
    record = sign_record(
        other,
        endpoints=("127.0.0.1:1",),
        overlay_address="",
        capabilities=Capabilities(),
        version="t",
        seq=1,
        expires=2**40,
    )
    before = agent.status()["peer_count"]
    frame = encode_frame(other, MessageType.RECORD, 1, {"record": record.blob}, sign=True)
    sock.sendto(frame, address)
    payload, _ = msgpack.unpackb(record.blob)
    forged = msgpack.packb([payload, bytes(64)])
    sock.sendto(encode_frame(other, MessageType.RECORD, 2, {"record": forged}, sign=True), address)
    assert ping(sock, address, 5)  # both handled by now: frames are processed in order
    assert agent.status()["peer_count"] == before + 1
    db = sqlite3.connect(Path(agent.state_dir) / "state.db")
    stored = [row[0] for row in db.execute("SELECT record FROM peers")]
    db.close()
    assert record.blob in stored and forged not in stored


BAD_REQUESTS = [
    ("vm_start", {"name": "x", "tap": "t", "image_id": "i", "args": ""}),  # no grant
    ("vm_start", {"name": "x", "tap": "t", "grant": b"not a grant"}),
    ("vm_migrate", {"name": "x"}),
    ("vm_expect", {"name": "x", "tap": "t"}),
    ("vm_attach", {"grant": b"x", "device": "d", "gateway": "g"}),
    ("vm_attach", {}),
    ("segment_run", {"job": "j", "segment": "zero", "image_id": "i"}),
    ("segment_run", {"job": "j", "segment": 0, "image_id": "0" * 64, "checkpoint": b"zz"}),
    ("vm_start", {"name": 5, "tap": "t", "grant": b"g"}),
    ("vm_expect", {"name": "x", "tap": "t\x00"}),
    ("no_such_method", {}),
]


@pytest.mark.parametrize(("method", "params"), BAD_REQUESTS)
def test_bad_control_requests_get_one_clear_error_and_the_agent_stays_up(
    root_agent: AgentProcess, method, params
):
    from node.runtime.control import ControlError, call

    root_agent.start()
    with pytest.raises(ControlError) as info:
        call(root_agent.socket, method, params)
    assert "\n" not in str(info.value) and str(info.value)
    assert not str(info.value).startswith("internal error"), str(info.value)[:200]
    assert root_agent.status()["node_id"]
    assert root_agent.process is not None and root_agent.process.poll() is None


@pytest.mark.parametrize(
    ("device", "gateway", "named"),
    [("a\x00b", "", "device"), ("x" * 16, "", "device"), ("d", "g" * 3_000_000, "gateway")],
)
def test_a_route_request_with_a_bad_device_or_gateway_is_refused_before_ip_runs(
    root_agent: AgentProcess, device, gateway, named
):
    # with a grant good for this node these reached `ip -6 route` (a NUL byte, a 3 MB
    # argument) and came back as "internal error", with a traceback in the log
    from node.base.identity import Identity, NodeId
    from node.runtime.control import ControlError, call
    from overlay.claims import sign_grant

    status = root_agent.start()
    grant = sign_grant(
        Identity.generate(),
        swarm_id=status["swarm_id"],
        job_nonce=b"n" * 16,
        node_id=NodeId.parse(status["node_id"]),
        epoch=1,
        expires=int(time.time()) + 600,
    )
    params = {"grant": grant.blob, "device": device, "gateway": gateway}
    with pytest.raises(ControlError) as info:
        call(root_agent.socket, "vm_attach", params)
    assert str(info.value).startswith(named), str(info.value)[:200]
    assert root_agent.status()["node_id"]
