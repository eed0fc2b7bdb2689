"""The control socket: one request's trouble stays that request's."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from node.runtime.control import ControlError, ControlServer, call


async def handler(method: str, params: dict[str, Any]) -> Any:
    return {"huge": 2**65, "object": object(), "ping": "pong"}[method]


@pytest.mark.parametrize("method", ["huge", "object"])
def test_a_reply_msgpack_cannot_carry_is_an_error_and_the_server_serves_on(
    tmp_path: Path, method: str
) -> None:
    # an unencodable reply used to escape the connection and stop the control server
    server = ControlServer(tmp_path / "control.sock", handler)

    async def main() -> tuple[str, str]:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            with pytest.raises(ControlError) as info:
                await trio.to_thread.run_sync(call, server.path, method)
            again = await trio.to_thread.run_sync(call, server.path, "ping")
            nursery.cancel_scope.cancel()
        return str(info.value), again

    error, again = trio.run(main)
    assert error.startswith("internal error: reply") and again == "pong"
    assert server.internal_errors == 1


def test_the_socket_is_owner_only_from_the_start_and_the_umask_is_left_alone(
    tmp_path: Path,
) -> None:
    server = ControlServer(tmp_path / "control.sock", handler)
    before = os.umask(0o022)
    os.umask(before)

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            mode = stat.S_IMODE(server.path.stat().st_mode)
            assert await trio.to_thread.run_sync(call, server.path, "ping") == "pong"
            nursery.cancel_scope.cancel()
        return mode

    assert trio.run(main) == 0o600
    after = os.umask(before)
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == []  # no private folder left, socket gone
