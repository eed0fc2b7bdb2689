"""Guest consoles as the demo guest prints them: its start line and chain steps."""

from __future__ import annotations

from segments.image import workload


def chain_lines(seed: str, first: int, last: int) -> str:
    """``gleaner-progress`` lines first..last of the chain from `seed`, as the tty writes them."""
    states = workload.reference_states(seed, last)
    return "".join(f"gleaner-progress {i} {states[i - 1]}\r\n" for i in range(first, last + 1))


def boot_console(seed: str, last: int, steps: int = 0) -> str:
    """A kernel line, ``gleaner-start``, then the chain's steps 1..last."""
    return f"[    0.000000] Linux version 6.1\r\ngleaner-start {steps} {seed}\r\n" + chain_lines(
        seed, 1, last
    )
