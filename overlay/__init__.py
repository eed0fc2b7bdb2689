"""Gleaner overlay: address plan, route table, WireGuard desired state and diff.

The modules directly in this package are sans-IO cores; the adapters that touch
WireGuard live in overlay/wireguard/.
"""

# Every module directly in this package is a sans-IO core (tests/unit/test_import_graph.py).
SANS_IO = True
