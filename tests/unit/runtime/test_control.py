"""The control socket: one request's trouble stays that request's."""

from __future__ import annotations

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
