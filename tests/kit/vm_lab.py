"""Real libvirt "hosts" for the testbed's VM tests: namespaces, private libvirtds, the demo guest.

A host is a network namespace with its own private libvirtd (``segments.vm.libvirtd``);
``two_hosts`` joins two by a veth pair (198.51.100.221/24 and .222/24), ``one_host``
makes one. Daemons, QEMU and namespaces are removed on every path (an ``ExitStack``).
The guest is the demo image (``segments.image.store``, recipe deploy/recipes/demo.toml)
running its hash chain forever. The fixtures ``guest``, ``lab`` (both once per module)
and ``hosts`` (the lab, every domain removed after each test) are registered for
tests/testbed by its conftest.py. Timings are printed (``pytest -s``) by ``figure``.
"""

from __future__ import annotations

import contextlib
import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kit.paths import DEMO_RECIPE
from node.testbed import netns
from segments.image import store as image
from segments.image import workload
from segments.vm.libvirtd import Libvirtd
from segments.vm.runtime import LibvirtRuntime, VmState

UNDERLAY = ("198.51.100.221", "198.51.100.222")
PACKAGE_CACHE = Path("/var/cache/gleaner/packages")
RECIPE = DEMO_RECIPE
SEED = "glv"


def figure(name: str, value: float, unit: str = "s") -> None:
    print(f"\nFIGURE {name} = {value:.3f} {unit}")


@dataclass(frozen=True)
class Guest:
    kernel: Path
    initrd: Path
    base_cmdline: str
    cmdline: str  # runs the chain until stopped
    memory_mb: int


@dataclass
class Host:
    name: str
    netns: str
    address: str
    daemon: Libvirtd
    runtime: LibvirtRuntime


@dataclass
class Lab:
    a: Host
    b: Host
    namespaces: tuple[str, str]


@contextlib.contextmanager
def two_hosts(root: Path, seed_b_from_a: bool = True) -> Iterator[Lab]:
    """Two namespaces, a veth between them, a private libvirtd in each; all gone on exit."""
    tag = secrets.token_hex(3)
    names = (f"glv-{tag}-a", f"glv-{tag}-b")
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.callback(netns.delete_namespace, name)
            netns.add_namespace(name)
        netns.add_veth_between(names[0], "va", names[1], "vb")
        netns.ip("addr", "add", f"{UNDERLAY[0]}/24", "dev", "va", netns=names[0])
        netns.ip("addr", "add", f"{UNDERLAY[1]}/24", "dev", "vb", netns=names[1])
        hosts: list[Host] = []
        for index, (label, name) in enumerate(zip("ab", names, strict=True)):
            seed = hosts[0].daemon.capabilities_dir if hosts and seed_b_from_a else None
            daemon = Libvirtd(
                label,
                root / label,
                name,
                str(uuid.uuid4()),
                capabilities_seed=seed,
                migration_address=UNDERLAY[index],
            )
            stack.callback(daemon.stop)
            started = time.monotonic()
            daemon.start()
            figure(f"libvirtd_start_{label}", time.monotonic() - started)
            if index == 0 or seed_b_from_a:
                started = time.monotonic()
                daemon.warm_up()
                figure(f"libvirtd_warm_up_{label}", time.monotonic() - started)
            runtime = LibvirtRuntime(daemon.uri)
            stack.callback(runtime.close)
            hosts.append(Host(label, name, UNDERLAY[index], daemon, runtime))
        yield Lab(hosts[0], hosts[1], names)


@contextlib.contextmanager
def one_host(root: Path) -> Iterator[LibvirtRuntime]:
    """A namespace and a private libvirtd in it (as two_hosts makes them); gone on exit."""
    name = f"glv-{secrets.token_hex(3)}-v"
    with contextlib.ExitStack() as stack:
        stack.callback(netns.delete_namespace, name)
        netns.add_namespace(name)
        daemon = Libvirtd("v", root / "v", name, str(uuid.uuid4()))
        stack.callback(daemon.stop)
        daemon.start()
        daemon.warm_up()
        runtime = LibvirtRuntime(daemon.uri)
        stack.callback(runtime.close)
        yield runtime


# -- fixtures (registered in tests/testbed/conftest.py) ------------------------------------


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Guest:
    """The demo image, built once per module; its command line runs the chain forever."""
    built = image.build(RECIPE, tmp_path_factory.mktemp("images"), PACKAGE_CACHE)
    return Guest(
        kernel=built.kernel,
        initrd=built.initrd,
        base_cmdline=built.cmdline,
        cmdline=workload.kernel_cmdline(steps=0, seed=SEED, base=built.cmdline),
        memory_mb=built.memory_mb,
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Two hosts, made once per module (use ``hosts``, which cleans up after each test)."""
    with two_hosts(tmp_path_factory.mktemp("glv")) as made:
        yield made


@pytest.fixture
def hosts(lab: Lab) -> Iterator[Lab]:
    """The module's lab, with every domain on both hosts destroyed and undefined afterwards."""
    try:
        yield lab
    finally:
        for host in (lab.a, lab.b):
            for name, state in host.runtime.list_vms().items():
                if state is not VmState.SHUTOFF:
                    host.runtime.destroy(name)
                if name in host.runtime.list_vms():
                    host.runtime.undefine(name)
