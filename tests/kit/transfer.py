"""A block server on loopback for the transfer tests: any BlockSource, cancellable."""

from __future__ import annotations

import trio

from segments.store.transfer import BlockSource, serve_blocks


async def start_server(nursery: trio.Nursery, source: BlockSource) -> tuple[trio.CancelScope, int]:
    """Serve `source` on 127.0.0.1 (a free port) in `nursery`; the scope stops it."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            async with listener:
                await serve_blocks(source, listener, timeout_s=10)

    nursery.start_soon(run)
    return scope, port
