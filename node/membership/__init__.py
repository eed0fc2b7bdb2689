"""Who is in the swarm: the SWIM machine, the member table, the transmit queue
and the update codec."""

# Every module of this package is a sans-IO core (tests/unit/test_import_graph.py).
SANS_IO = True
