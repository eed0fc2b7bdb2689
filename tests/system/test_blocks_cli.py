"""`gleaner blocks put/get` against a real block server on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

SERVER = """
import sys, trio
from pathlib import Path
from segments.store.blocks import BlockStore
from segments.store.transfer import serve_blocks

async def main():
    store = BlockStore(Path(sys.argv[1]))
    listeners = await trio.open_tcp_listeners(int(sys.argv[2]), host="127.0.0.1")
    await serve_blocks(store, listeners[0])

trio.run(main)
"""


def gleaner(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=120
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_put_then_get_through_a_block_server(tmp_path):
    source = tmp_path / "checkpoint.bin"
    source.write_bytes(os.urandom(300_000) + bytes(200_000) + os.urandom(50_000))
    put = gleaner(
        "blocks",
        "put",
        str(source),
        "--store",
        str(tmp_path / "a"),
        "--manifest",
        str(tmp_path / "m"),
        "--state-dir",
        str(tmp_path / "key"),
    )
    assert put.returncode == 0, put.stderr
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path / "a"), str(port)])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        get = gleaner(
            "blocks",
            "get",
            str(tmp_path / "m"),
            "--holder",
            f"127.0.0.1:{port}",
            "--store",
            str(tmp_path / "b"),
            "--output",
            str(tmp_path / "out.bin"),
        )
        assert get.returncode == 0, get.stderr
        assert (tmp_path / "out.bin").read_bytes() == source.read_bytes()
        assert "fetched" in get.stdout
        again = gleaner(
            "blocks",
            "get",
            str(tmp_path / "m"),
            "--holder",
            f"127.0.0.1:{port}",
            "--store",
            str(tmp_path / "b"),
        )
        assert "fetched 0 blocks" in again.stdout  # resumed: nothing verified is fetched twice
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_bad_manifest_and_holder_are_one_line_errors(tmp_path):
    (tmp_path / "m").write_bytes(b"not a manifest")
    bad = gleaner(
        "blocks",
        "get",
        str(tmp_path / "m"),
        "--holder",
        "127.0.0.1:1",
        "--store",
        str(tmp_path / "s"),
    )
    assert bad.returncode == 1
    assert len(bad.stderr.strip().splitlines()) == 1 and "not a valid manifest" in bad.stderr
