"""`gleaner testbed | demo`: a local multi-host swarm in network namespaces.

gleaner testbed up [--hosts N] [--segments 1|2] …   start N hosts, each with an agent
gleaner testbed down                                 stop them, remove the namespaces
gleaner testbed vm add NAME | vm move NAME HOST      VM stand-ins that move between hosts
gleaner testbed status                               the running testbed's hosts
gleaner demo [--hosts N]                             the main demo on such a swarm
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from node.cli.common import CliError, Subcommands, add_command, print_json
from node.testbed.testbed import DEFAULT_ROOT


def add_testbed_command(sub: Subcommands) -> None:
    testbed = add_command(
        sub, "testbed", cmd_testbed, "a local multi-host swarm in network namespaces"
    )
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


def add_demo_command(sub: Subcommands) -> None:
    demo = add_command(sub, "demo", cmd_demo, "run the main demo on a local testbed swarm")
    demo.add_argument("--hosts", type=int, default=4)
    demo.add_argument("--root", default=str(DEFAULT_ROOT))


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
                print_json(hosts)
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
            print_json(result)
        elif args.testbed_command == "down":
            removed = testbed.down(root=Path(args.root))
            if args.json:
                print_json(removed)
            else:
                print(
                    f"testbed down: stopped {len(removed['stopped'])} agents, "
                    f"removed {len(removed['namespaces'])} namespaces"
                )
        else:
            status = testbed.status(root=Path(args.root))
            print_json(status) if args.json else print(json.dumps(status, indent=2))
    except testbed.TestbedError as exc:
        raise CliError(f"testbed: {exc}") from None
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from node.testbed import demo

    return demo.run(hosts=args.hosts, root=Path(args.root))
