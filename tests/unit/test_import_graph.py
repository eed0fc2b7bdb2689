"""The rules of the house, read from the code's own imports.

Every module of node/, overlay/ and segments/ is parsed (never imported), and
every import it makes counts: at the top, inside a function, or behind
TYPE_CHECKING. From that graph the test holds three rules:

1. No import cycle, between modules or between the rooms (sub-packages) of node/.
2. overlay/ and segments/ import nothing of node/ but node/base/, and node/base/
   imports nothing else of node/.
3. A core is sans-IO. A module is a core when its package's ``__init__`` says
   ``SANS_IO = True`` (node/base, membership, market, ledger, policy, the top of
   overlay/) or, in a package that mixes cores and adapters, when the module
   itself says so. A core reaches no I/O, clock or randomness module, directly
   or through any module of ours it imports.

Also: no module imports another module's private name.

The checks are plain functions over {module name: source}, so the tests at the
bottom can feed them a small made-up tree and watch each rule fail.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP_PACKAGES = ("node", "overlay", "segments")
# What a core never reaches: sockets, files, processes, threads, databases, the
# clock and randomness (cores take `now` and a random.Random as arguments).
IMPURE = frozenset(
    {
        "asyncio",
        "concurrent",
        "datetime",
        "fcntl",
        "libvirt",
        "logging",
        "os",
        "pathlib",
        "pyroute2",
        "random",
        "select",
        "selectors",
        "shutil",
        "signal",
        "socket",
        "sqlite3",
        "subprocess",
        "tempfile",
        "threading",
        "time",
        "trio",
        "zeroconf",
    }
)
# overlay/ and segments/ may use these rooms of node/, and these only.
SHARED_ROOM = "node.base"


@dataclass(frozen=True)
class Module:
    name: str
    is_package: bool
    tree: ast.Module

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]


def read_tree(root: Path = ROOT) -> dict[str, Module]:
    modules = {}
    for top in TOP_PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            modules[name] = Module(name, is_package, ast.parse(path.read_text(), str(path)))
    return modules


def parse_sources(sources: Mapping[str, str]) -> dict[str, Module]:
    """A made-up tree for the tests of the rules: names ending in .__init__ are packages."""
    modules = {}
    for name, text in sources.items():
        is_package = name.endswith(".__init__")
        name = name.removesuffix(".__init__")
        modules[name] = Module(name, is_package, ast.parse(text))
    return modules


@dataclass(frozen=True)
class Imports:
    ours: dict[str, set[str]]  # module -> modules of ours it imports
    theirs: dict[str, set[str]]  # module -> top-level names of everything else
    private: dict[str, set[str]]  # module -> "module._name" it takes from another module


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def collect_imports(modules: Mapping[str, Module]) -> Imports:
    ours: dict[str, set[str]] = {name: set() for name in modules}
    theirs: dict[str, set[str]] = {name: set() for name in modules}
    private: dict[str, set[str]] = {name: set() for name in modules}

    def note(name: str, target: str) -> None:
        if target.split(".")[0] not in TOP_PACKAGES:
            theirs[name].add(target.split(".")[0])
            return
        while target and target not in modules:  # an attribute of a module: the module
            target = target.rpartition(".")[0]
        if target and target != name:
            ours[name].add(target)

    for name, module in modules.items():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    note(name, alias.name)
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(module, node)
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    if full in modules:  # `from package import module`
                        note(name, full)
                        continue
                    note(name, source)
                    if (
                        alias.name.startswith("_")
                        and not alias.name.startswith("__")
                        and source in modules
                        and source != name
                    ):
                        private[name].add(full)
    return Imports(ours, theirs, private)


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, the ones with a cycle, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(start: str) -> None:  # iterative, so a deep graph cannot overflow
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def room(name: str) -> str:
    """node.market.jobs -> node.market; overlay.claims -> overlay; node -> node."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0] if parts[0] != "node" else name


def room_cycles(modules: Mapping[str, Module], imports: Imports) -> list[list[str]]:
    """Cycles between node's rooms (node.base, node.market, …), each room as one node."""
    graph: dict[str, set[str]] = {}
    for name, targets in imports.ours.items():
        if not name.startswith("node."):
            continue
        source = ".".join(name.split(".")[:2])
        graph.setdefault(source, set())
        for target in targets:
            if target.startswith("node.") and target.count(".") >= 1:
                dest = ".".join(target.split(".")[:2])
                if dest != source and dest in {".".join(m.split(".")[:2]) for m in modules}:
                    graph[source].add(dest)
    return find_cycles(graph)


def layering_violations(imports: Imports) -> list[str]:
    found = []
    for name, targets in sorted(imports.ours.items()):
        for target in sorted(targets):
            in_node = target == "node" or target.startswith("node.")
            shared = target == SHARED_ROOM or target.startswith(SHARED_ROOM + ".")
            if name.split(".")[0] in ("overlay", "segments") and in_node and not shared:
                found.append(f"{name} imports {target}: overlay/ and segments/ use only node.base")
            if name.startswith(SHARED_ROOM + ".") and in_node and not shared and target != "node":
                found.append(f"{name} imports {target}: node.base imports nothing else of node/")
    return found


def _says_sans_io(module: Module) -> bool:
    for statement in module.tree.body:
        if (
            isinstance(statement, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "SANS_IO" for t in statement.targets)
            and isinstance(statement.value, ast.Constant)
            and statement.value.value is True
        ):
            return True
    return False


def find_cores(modules: Mapping[str, Module]) -> list[str]:
    """Modules whose package says SANS_IO (its direct modules), or that say it themselves."""
    pure_packages = {m.name for m in modules.values() if m.is_package and _says_sans_io(m)}
    return sorted(
        name
        for name, module in modules.items()
        if _says_sans_io(module) or (not module.is_package and module.package in pure_packages)
    )


def impurity(core: str, imports: Imports) -> dict[str, list[str]]:
    """What impure module each module of ours that `core` reaches imports: {module: [names]}."""
    seen, todo, found = {core}, [core], {}
    while todo:
        name = todo.pop()
        bad = sorted(imports.theirs[name] & IMPURE)
        if bad:
            found[name] = bad
        for target in imports.ours[name] - seen:
            seen.add(target)
            todo.append(target)
    return found


def private_imports(imports: Imports) -> list[str]:
    return [
        f"{name} imports {full}"
        for name, names in sorted(imports.private.items())
        for full in sorted(names)
    ]


# --- the tree as it is -------------------------------------------------------------

MODULES = read_tree()
IMPORTS = collect_imports(MODULES)
CORES = find_cores(MODULES)


def test_the_walk_sees_the_whole_tree() -> None:
    assert {"node.base.wire", "node.runtime.agent", "overlay.routes"} <= MODULES.keys()
    assert "node.base.wire" in IMPORTS.ours["node.base.signed"]
    assert {"node.membership.swim", "node.market.jobs", "overlay.claims"} <= set(CORES)


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


def test_a_module_that_says_it_is_a_core_is_held_to_it() -> None:
    _, imports = small(**{"segments.store.manifest": "import pathlib\nSANS_IO = True"})
    assert impurity("segments.store.manifest", imports) == {"segments.store.manifest": ["pathlib"]}


def test_a_private_name_taken_from_another_module_is_refused() -> None:
    _, imports = small(**{"node.runtime.agent": "from node.market.jobs import _move"})
    assert private_imports(imports) == ["node.runtime.agent imports node.market.jobs._move"]
