"""The host policy: when the volunteer's own use pauses, vacates or drains this
host's guests."""

# Every module of this package is a sans-IO core (tests/unit/test_import_graph.py).
SANS_IO = True
