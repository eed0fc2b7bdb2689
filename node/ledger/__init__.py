"""Hash-chain payment: token chains, the journal, the payer, the payee and their
shared effect loop."""

# Every module of this package is a sans-IO core (tests/unit/test_import_graph.py).
SANS_IO = True
