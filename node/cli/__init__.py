"""The `gleaner` command, one module per command group."""
