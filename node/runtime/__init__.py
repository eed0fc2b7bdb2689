"""The trio side: the agent and the services that carry out the cores' effects
against real adapters (sockets, SQLite, zeroconf, libvirt, WireGuard)."""
