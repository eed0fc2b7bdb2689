"""Cores are sans-IO: they import no I/O, clock or randomness modules."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORES = [
    "node/base/wire.py",
    "node/base/records.py",
    "node/membership/swim.py",
    "node/membership/dissemination.py",
    "node/base/signed.py",
    "node/ledger/tokens.py",
    "node/ledger/journal.py",
    "node/ledger/effects.py",
    "node/market/handoff.py",
    "node/ledger/payer.py",
    "node/ledger/payee.py",
    "overlay/addressing.py",
    "overlay/wgstate.py",
    "overlay/desired.py",
    "segments/image/cpio.py",
    "segments/image/workload.py",
    "segments/store/transfer_core.py",
    "segments/store/manifest.py",
    "overlay/claims.py",
    "overlay/routes.py",
    "node/market/messages.py",
    "node/market/auction.py",
    "node/market/bidder.py",
    "node/policy/machine.py",
    "node/market/reputation.py",
    "node/market/jobs.py",
    "node/market/segment_machine.py",
    "node/market/job_records.py",
    "segments/vm/progress.py",
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
