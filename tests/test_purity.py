"""Cores are sans-IO: they import no I/O, clock or randomness modules."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORES = [
    "node/wire.py",
    "node/records.py",
    "node/membership.py",
    "node/dissemination.py",
    "node/signed.py",
    "node/tokens.py",
    "node/ledger.py",
    "node/ledger_effects.py",
    "node/handoff.py",
    "node/payer.py",
    "node/payee.py",
    "overlay/addressing.py",
    "overlay/wgstate.py",
    "overlay/desired.py",
    "segments/cpio.py",
    "segments/workload.py",
    "segments/transfer_core.py",
    "segments/manifest.py",
    "overlay/claims.py",
    "overlay/routes.py",
    "node/market.py",
    "node/auction.py",
    "node/bidder.py",
    "node/host_policy.py",
    "node/reputation.py",
    "node/jobs.py",
    "node/segment_machine.py",
    "node/job_records.py",
    "segments/progress.py",
]
FORBIDDEN = {
    "trio",
    "socket",
    "time",
    "random",
    "zeroconf",
    "libvirt",
    "subprocess",
    "asyncio",
    "os",
}


def imported_roots(path: Path) -> set[str]:
    """The top-level packages a Python file imports."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    return imported


@pytest.mark.parametrize("module", CORES)
def test_core_imports_no_io(module):
    imported = imported_roots(ROOT / module)
    assert not imported & FORBIDDEN, f"{module} imports {sorted(imported & FORBIDDEN)}"
