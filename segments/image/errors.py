"""The one error type of guest images, shared by the pure and the IO modules of segments/image."""

from __future__ import annotations

SANS_IO = True


class ImageError(Exception):
    """A guest image cannot be built, imported or loaded; the message is one clear line."""
