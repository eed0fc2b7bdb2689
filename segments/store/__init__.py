"""Content-addressed blocks, manifests and their transfer between hosts."""
