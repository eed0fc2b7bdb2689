"""The segment market: messages and statements, jobs, auctions, bids, reputation,
live hand-offs, the owner's segment machine."""

# Every module of this package is a sans-IO core (tests/unit/test_import_graph.py).
SANS_IO = True
