"""The import graph of node/, overlay/ and segments/, read from source (never imported).

The walker and the rule checks behind tests/unit/test_import_graph.py (which states
the rules), as plain functions over {module name: source}; `imported_roots` answers
the simpler question other tests ask of one file: which top-level packages does it
import, counting every import (at the top, inside a function, behind TYPE_CHECKING).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from kit.paths import REPO_ROOT

ROOT = REPO_ROOT
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
# The simulator runs the same cores as the agent, never the agent's trio side.
TRIO_SIDE = ("node.runtime", "node.cli", "node.testbed", "overlay.wireguard")


@dataclass(frozen=True)
class Module:
    name: str
    is_package: bool
    tree: ast.Module

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]


def module_name(path: Path, root: Path = ROOT) -> tuple[str, bool]:
    """node/market/jobs.py -> ("node.market.jobs", False); node/market/__init__.py -> package."""
    parts = path.relative_to(root).with_suffix("").parts
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def read_tree(root: Path = ROOT) -> dict[str, Module]:
    modules = {}
    for top in TOP_PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            name, is_package = module_name(path, root)
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
            if name.startswith("node.sim.") and target.startswith(TRIO_SIDE):
                found.append(f"{name} imports {target}: the simulator drives cores only")
    return found


def says_sans_io(module: Module) -> bool:
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
    pure_packages = {m.name for m in modules.values() if m.is_package and says_sans_io(m)}
    return sorted(
        name
        for name, module in modules.items()
        if not module.is_package and (says_sans_io(module) or module.package in pure_packages)
    )


def impurity(core: str, imports: Imports) -> dict[str, list[str]]:
    """What impure module each module of ours that `core` reaches imports: {module: [names]}.

    Importing a module runs its packages' ``__init__`` first, so they count as reached.
    """
    seen, todo, found = {core}, [core], {}
    while todo:
        name = todo.pop()
        bad = sorted(imports.theirs[name] & IMPURE)
        if bad:
            found[name] = bad
        parents = {name.rsplit(".", depth)[0] for depth in range(1, name.count(".") + 1)}
        for target in (imports.ours[name] | (parents & imports.ours.keys())) - seen:
            seen.add(target)
            todo.append(target)
    return found


def private_imports(imports: Imports) -> list[str]:
    return [
        f"{name} imports {full}"
        for name, names in sorted(imports.private.items())
        for full in sorted(names)
    ]


@cache
def tree_modules(root: Path = ROOT) -> dict[str, Module]:
    """The whole tree under `root`, read once per run (do not change what it returns)."""
    return read_tree(root)


@cache
def tree_imports(root: Path = ROOT) -> Imports:
    """The imports of the whole tree under `root`, read once per run."""
    return collect_imports(tree_modules(root))


def imported_roots(path: Path, root: Path = ROOT) -> set[str]:
    """The top-level packages a module of the tree imports: ours and everyone else's."""
    name, _ = module_name(path.resolve(), root)
    imports = tree_imports(root)
    return imports.theirs[name] | {target.split(".")[0] for target in imports.ours[name]}
