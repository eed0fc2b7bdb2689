"""Gleaner overlay: address plan, route table, WireGuard desired state and backends."""
