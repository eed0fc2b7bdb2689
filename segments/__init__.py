"""Gleaner segments: the block store (store/), the VM side (vm/) and guest images (image/).

These packages mix cores and adapters, so each pure module says so itself with
``SANS_IO = True`` (tests/unit/test_import_graph.py holds it to that).
"""
