"""The rules of the house, read from the code's own imports.

Every module of node/, overlay/ and segments/ is parsed (never imported), and
every import it makes counts: at the top, inside a function, or behind
TYPE_CHECKING. From that graph the test holds three rules:

1. No import cycle, between modules or between the rooms (sub-packages) of node/.
2. overlay/ and segments/ import nothing of node/ but node/base/, node/base/
   imports nothing else of node/, and the simulator (node/sim) imports none of
   the agent's trio side (node/runtime, cli, testbed, overlay/wireguard).
3. A core is sans-IO. A module is a core when its package's ``__init__`` says
   ``SANS_IO = True`` (node/base, membership, market, ledger, policy, the top of
   overlay/) or, in a package that mixes cores and adapters, when the module
   itself says so. A core reaches no I/O, clock or randomness module, directly
   or through any module of ours it imports.

Also: no module imports another module's private name.

The checks are plain functions over {module name: source} (tests/kit/import_graph.py),
so the tests at the bottom can feed them a small made-up tree and watch each rule fail.
"""

from __future__ import annotations

import pytest
from kit.import_graph import (
    Imports,
    Module,
    collect_imports,
    find_cores,
    find_cycles,
    impurity,
    layering_violations,
    parse_sources,
    private_imports,
    room_cycles,
    says_sans_io,
    tree_imports,
    tree_modules,
)

# --- the tree as it is -------------------------------------------------------------

MODULES = tree_modules()
IMPORTS = tree_imports()
CORES = find_cores(MODULES)


def test_the_walk_sees_the_whole_tree() -> None:
    assert {"node.base.wire", "node.runtime.agent", "overlay.routes"} <= MODULES.keys()
    assert "node.base.wire" in IMPORTS.ours["node.base.signed"]
    assert {"node.membership.swim", "node.market.jobs", "overlay.claims"} <= set(CORES)


def test_the_pure_packages_and_modules_are_the_ones_the_architecture_names() -> None:
    # a package that lost its SANS_IO line would drop all its modules from the rule silently
    pure_packages = {m.name for m in MODULES.values() if m.is_package and says_sans_io(m)}
    assert pure_packages == {
        "node.base",
        "node.membership",
        "node.market",
        "node.ledger",
        "node.policy",
        "overlay",
    }
    pure_by_themselves = {m.name for m in MODULES.values() if not m.is_package and says_sans_io(m)}
    assert pure_by_themselves == {
        "segments.store.manifest",
        "segments.store.transfer_core",
        "segments.vm.progress",
        "segments.image.workload",
        "segments.image.cpio",
        "segments.image.errors",
        "segments.image.archive_paths",
        "segments.image.layers",
        "segments.image.tarstream",
        "segments.image.runner",
    }


def test_no_module_import_cycle() -> None:
    assert find_cycles(IMPORTS.ours) == []


def test_no_cycle_between_the_rooms_of_node() -> None:
    assert room_cycles(MODULES, IMPORTS) == []


def test_overlay_and_segments_use_only_node_base() -> None:
    assert layering_violations(IMPORTS) == []


@pytest.mark.parametrize("core", CORES)
def test_core_reaches_no_io_clock_or_randomness(core: str) -> None:
    assert impurity(core, IMPORTS) == {}


def test_no_module_imports_another_modules_private_names() -> None:
    assert private_imports(IMPORTS) == []


# --- the rules catch what they are for ---------------------------------------------

SMALL_TREE = {
    "node.__init__": "",
    "node.base.__init__": "SANS_IO = True",
    "node.base.wire": "import msgpack",
    "node.market.__init__": "SANS_IO = True",
    "node.market.jobs": "from node.base import wire",
    "node.runtime.__init__": "",
    "node.runtime.agent": "import trio\nfrom node.market.jobs import Job",
    "overlay.__init__": "SANS_IO = True",
    "overlay.claims": "from node.base.wire import encode",
    "segments.__init__": "",
    "segments.store.__init__": "",
    "segments.store.manifest": "import msgpack\nSANS_IO = True",
    "segments.store.blocks": "import os\nfrom segments.store import manifest",
}


def small(**changes: str) -> tuple[dict[str, Module], Imports]:
    modules = parse_sources({**SMALL_TREE, **changes})
    return modules, collect_imports(modules)


def test_the_small_tree_breaks_no_rule() -> None:
    modules, imports = small()
    assert find_cycles(imports.ours) == []
    assert room_cycles(modules, imports) == []
    assert layering_violations(imports) == []
    assert find_cores(modules) == [
        "node.base.wire",
        "node.market.jobs",
        "overlay.claims",
        "segments.store.manifest",
    ]
    assert all(impurity(core, imports) == {} for core in find_cores(modules))


def test_a_cycle_is_found_even_inside_a_function_or_behind_type_checking() -> None:
    _, imports = small(
        **{
            "node.market.jobs": "from node.base import wire\nfrom node.market import auction",
            "node.market.auction": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from node.market.bids import Bid",
            "node.market.bids": "def f():\n    from node.market.jobs import Job",
        }
    )
    assert find_cycles(imports.ours) == [
        ["node.market.auction", "node.market.bids", "node.market.jobs"]
    ]


def test_a_cycle_between_rooms_is_found() -> None:
    modules, imports = small(**{"node.base.records": "from node.runtime import agent"})
    assert room_cycles(modules, imports) != []


def test_overlay_reaching_past_node_base_is_refused() -> None:
    _, imports = small(**{"overlay.routes": "from node.runtime.agent import Agent"})
    assert layering_violations(imports) == [
        "overlay.routes imports node.runtime.agent: overlay/ and segments/ use only node.base"
    ]


def test_the_simulator_reaching_into_the_runtime_is_refused() -> None:
    _, imports = small(**{"node.sim.swarm": "from node.runtime.agent import TOPIC"})
    assert layering_violations(imports) == [
        "node.sim.swarm imports node.runtime.agent: the simulator drives cores only"
    ]


def test_node_base_reaching_into_node_is_refused() -> None:
    _, imports = small(**{"node.base.records": "import node.market.jobs"})
    assert layering_violations(imports) == [
        "node.base.records imports node.market.jobs: node.base imports nothing else of node/"
    ]


def test_a_core_importing_io_directly_is_refused() -> None:
    _, imports = small(**{"node.market.jobs": "import sqlite3\nfrom node.base import wire"})
    assert impurity("node.market.jobs", imports) == {"node.market.jobs": ["sqlite3"]}


def test_a_core_reaching_io_through_another_module_is_refused() -> None:
    _, imports = small(
        **{
            "node.market.jobs": "from node.market import clock",
            "node.market.clock": "from node.runtime.agent import now",
        }
    )
    assert impurity("node.market.jobs", imports) == {"node.runtime.agent": ["trio"]}


def test_a_pure_packages_own_init_is_held_to_it_too() -> None:
    # importing node.market.jobs runs node/market/__init__.py first
    _, imports = small(**{"node.market.__init__": "SANS_IO = True\nimport trio"})
    assert impurity("node.market.jobs", imports) == {"node.market": ["trio"]}


def test_a_module_that_says_it_is_a_core_is_held_to_it() -> None:
    _, imports = small(**{"segments.store.manifest": "import pathlib\nSANS_IO = True"})
    assert impurity("segments.store.manifest", imports) == {"segments.store.manifest": ["pathlib"]}


def test_a_private_name_taken_from_another_module_is_refused() -> None:
    _, imports = small(**{"node.runtime.agent": "from node.market.jobs import _move"})
    assert private_imports(imports) == ["node.runtime.agent imports node.market.jobs._move"]
