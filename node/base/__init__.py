"""Pure building blocks every part may use: keys and node ids, the wire format,
the signed envelope, peer records. The only part of node/ that overlay/ and
segments/ import."""

# Every module of this package is a sans-IO core (tests/unit/test_import_graph.py).
SANS_IO = True
