"""Gleaner node: identity, wire format, state, membership, market, CLI."""

__version__ = "0.1.0"
