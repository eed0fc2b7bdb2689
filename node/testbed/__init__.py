"""Local swarms in network namespaces: the testbed, the demo, the prober."""
