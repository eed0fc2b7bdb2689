"""The `gleaner` command line: the agent, and the tools that talk to it.

Every command prints a readable table by default and one JSON document with
``--json``. Errors are one line on stderr and a non-zero exit: 2 for bad usage
or configuration, 1 for everything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from node import __version__
from node.runtime import config
from node.runtime.control import ControlError, call

EXIT_FAILURE = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A failure to report as one line; `code` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    if args.config:
        return _load_config(args).control_socket
    if args.state_dir:
        return Path(args.state_dir) / "control.sock"
    return config.load(None).control_socket


def _load_config(args: argparse.Namespace) -> config.Config:
    try:
        loaded = config.load(args.config)
        if getattr(args, "state_dir", None):
            loaded = loaded.replace(node__state_dir=args.state_dir)
    except config.ConfigError as exc:
        raise CliError(f"config error: {exc}", EXIT_USAGE) from None
    return loaded


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {seconds}s"
    return f"{minutes}m {seconds}s" if minutes else f"{seconds}s"


def cmd_agent(args: argparse.Namespace) -> int:
    import trio

    from node.base.identity import IdentityError
    from node.runtime.agent import run_agent
    from node.runtime.state import StateError

    loaded = _load_config(args)
    logging.basicConfig(
        level=getattr(logging, loaded["log.level"].upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        trio.run(run_agent, loaded)
    except (IdentityError, StateError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"agent failed to start: {exc}") from None
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = _rpc(args, "status")
    if args.json:
        _print_json(status)
        return 0
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("node id", status["node_id"]),
        ("name", status["name"] or "-"),
        ("version", status["version"]),
        ("swarm", status["swarm_id"]),
        ("uptime", _format_duration(status["uptime_s"])),
        ("underlay", ", ".join(status["underlay"]) or status["listen"]),
        ("overlay", status["overlay_address"]),
        ("peers", str(status["peer_count"])),
        ("policy", _policy_line(status.get("policy"))),
        ("protocol errors", str(status["protocol_errors"])),
        ("state", status["state_dir"]),
    ]
    for key, value in rows:
        table.add_row(key, value)
    _console().print(table)
    return 0


def _policy_line(policy: dict[str, Any] | None) -> str:
    if not policy:
        return "-"
    bidding = "bidding" if policy["bidding"] else "not bidding"
    running = policy["replicas_running"]
    return f"{policy['state']} ({policy['reason']}); {bidding}; {running} replica(s) here"


def cmd_peers(args: argparse.Namespace) -> int:
    peers = _rpc(args, "peers")
    if args.json:
        _print_json(peers)
        return 0
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("node", "overlay", "endpoint", "state", "handshake", "rx", "tx"):
        table.add_column(column, no_wrap=True)
    now = time.time()
    for peer in peers:
        handshake = peer["last_handshake"]
        table.add_row(
            peer["short_id"],
            peer["overlay_address"],
            peer["endpoint"] or "-",
            peer["state"],
            _format_duration(now - handshake) + " ago" if handshake else "never",
            _format_bytes(peer["rx_bytes"]),
            _format_bytes(peer["tx_bytes"]),
        )
    _console().print(table)
    return 0


def _format_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"


def _console() -> Any:
    """A rich console; when piped, wide enough that ids and addresses stay whole."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


def _rpc(args: argparse.Namespace, method: str, params: dict[str, Any] | None = None) -> Any:
    try:
        return call(_socket_path(args), method, params)
    except ControlError as exc:
        raise CliError(str(exc)) from None


def cmd_testbed(args: argparse.Namespace) -> int:
    from node.testbed import testbed

    try:
        if args.testbed_command == "up":
            hosts = testbed.up(
                args.hosts,
                root=Path(args.root),
                segments=args.segments,
                mdns=not args.no_mdns,
                bootstrap=args.bootstrap,
                libvirt=not args.no_libvirt,
            )
            if args.json:
                _print_json(hosts)
            else:
                for host in hosts:
                    print(f"{host['name']}  {host['netns']}  {host['underlay']}  {host['node_id']}")
        elif args.testbed_command == "vm":
            from node.testbed import vm as testbed_vm

            root = Path(args.root)
            result = (
                testbed_vm.vm_add(root, args.name)
                if args.vm_action == "add"
                else testbed_vm.vm_move(root, args.name, args.host)
            )
            _print_json(result)
        elif args.testbed_command == "down":
            removed = testbed.down(root=Path(args.root))
            if args.json:
                _print_json(removed)
            else:
                print(
                    f"testbed down: stopped {len(removed['stopped'])} agents, "
                    f"removed {len(removed['namespaces'])} namespaces"
                )
        else:
            status = testbed.status(root=Path(args.root))
            _print_json(status) if args.json else print(json.dumps(status, indent=2))
    except testbed.TestbedError as exc:
        raise CliError(f"testbed: {exc}") from None
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from node.testbed import demo

    return demo.run(hosts=args.hosts, root=Path(args.root))


def cmd_image(args: argparse.Namespace) -> int:
    from node.cli.image import main as image_main

    return image_main(args.image_args)


def cmd_blocks(args: argparse.Namespace) -> int:
    from node.cli.blocks import main as blocks_main

    return blocks_main(args.blocks_args)


def cmd_sim(args: argparse.Namespace) -> int:
    from node.sim.cli import main as sim_main
    from node.sim.scenario import ScenarioError

    try:
        return sim_main(args.scenario, args.seed, args.json, args.plot, print)
    except ScenarioError as exc:
        raise CliError(f"scenario: {exc}", EXIT_USAGE) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gleaner", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gleaner {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(
        name: str, func: Callable[[argparse.Namespace], int], help_text: str
    ) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(func=func)
        return command

    def add_target(command: argparse.ArgumentParser) -> None:
        command.add_argument("--config", help="the agent's config file")
        command.add_argument("--state-dir", help="the agent's state directory")
        command.add_argument("--socket", help="the agent's control socket")
        command.add_argument("--json", action="store_true", help="print JSON")

    agent = add("agent", cmd_agent, "run the agent in the foreground")
    agent.add_argument("--config", help="TOML config file (defaults for every field)")
    agent.add_argument("--state-dir", help="override node.state_dir")

    add_target(add("status", cmd_status, "show this node's agent: id, addresses, uptime, peers"))
    add_target(
        add("peers", cmd_peers, "list the swarm members this agent knows, with WireGuard state")
    )

    from node.cli.market import add_commands

    add_commands(add, add_target)

    from node.testbed.testbed import DEFAULT_ROOT

    testbed = add("testbed", cmd_testbed, "a local multi-host swarm in network namespaces")
    testbed.add_argument(
        "--root", default=str(DEFAULT_ROOT), help="where the testbed keeps its state"
    )
    testbed_sub = testbed.add_subparsers(dest="testbed_command", required=True, metavar="ACTION")
    up = testbed_sub.add_parser("up", help="start N hosts, each with an agent")
    up.add_argument("--hosts", type=int, default=3)
    up.add_argument("--segments", type=int, default=1, help="1 bridge, or 2 joined by a router")
    up.add_argument("--no-mdns", action="store_true", help="no multicast discovery")
    up.add_argument("--bootstrap", action="store_true", help="every host joins through h1")
    up.add_argument("--no-libvirt", action="store_true", help="no libvirtd in the hosts")
    up.add_argument("--json", action="store_true")
    down = testbed_sub.add_parser("down", help="stop every agent and remove every namespace")
    down.add_argument("--json", action="store_true")
    vm = testbed_sub.add_parser("vm", help="VM stand-ins: namespaces holding a VM overlay address")
    vm_sub = vm.add_subparsers(dest="vm_action", required=True, metavar="VM_ACTION")
    vm_add = vm_sub.add_parser("add", help="make a VM stand-in (not yet attached)")
    vm_add.add_argument("name")
    vm_move = vm_sub.add_parser("move", help="attach it at HOST; the agents move its address")
    vm_move.add_argument("name")
    vm_move.add_argument("host")
    show = testbed_sub.add_parser("status", help="the running testbed's hosts")
    show.add_argument("--json", action="store_true")

    image = sub.add_parser(
        "image", help="guest images: build RECIPE, list", add_help=False, prefix_chars="\0"
    )
    image.add_argument("image_args", nargs=argparse.REMAINDER)
    image.set_defaults(func=cmd_image)

    blocks = sub.add_parser(
        "blocks",
        help="block stores: put FILE…, get MANIFEST (progress)",
        add_help=False,
        prefix_chars="\0",
    )
    blocks.add_argument("blocks_args", nargs=argparse.REMAINDER)
    blocks.set_defaults(func=cmd_blocks)

    sim = add("sim", cmd_sim, "run a simulation scenario (node/sim/scenarios/*.toml)")
    sim.add_argument("scenario", help="the scenario's TOML file")
    sim.add_argument("--seed", type=int, default=1, help="the run's seed (default 1)")
    sim.add_argument("--json", action="store_true", help="print JSON")
    sim.add_argument("--plot", metavar="DIR", help="write PNG charts into DIR")

    demo = add("demo", cmd_demo, "run the main demo on a local testbed swarm")
    demo.add_argument("--hosts", type=int, default=4)
    demo.add_argument("--root", default=str(DEFAULT_ROOT))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"gleaner: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
