"""The few helpers that touch the host itself (processes by PID), shared by the
adapters of node/, overlay/ and segments/."""
