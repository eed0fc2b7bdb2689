"""A deterministic discrete-event simulator that drives the agent's sans-IO cores."""
