"""Errors of the overlay's adapters.

Every adapter failure (a WireGuard device that cannot be read or configured, a
daemon that will not start, an ``ip`` command that fails) is an ``OverlayError``
whose message says what was being done and on which interface, raised ``from``
the underlying exception so the cause stays in the traceback.
"""

from __future__ import annotations


class OverlayError(Exception):
    """An overlay adapter could not do what it was asked; the message says what and where."""
