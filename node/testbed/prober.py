"""A fixed-cadence ICMPv6 echo prober: one probe every interval, every loss counted.

`ping -i 0.01` really sends about every 16 ms here and under-counts loss
(LAB-NOTES), so benchmarks use this instead. Probes are sent on an absolute
schedule (probe i at start + i * interval, never drifting), each with its
sequence number, and replies are matched by sequence number. The result says
how many were lost, the longest gap between consecutive replies, and where the
losses were.

Run inside a namespace: ``python -m node.testbed.prober ADDRESS --interval-ms 1
--duration-s 10``; it prints one JSON object. Stops by itself after
``--duration-s`` or on SIGTERM/SIGINT (then prints what it has).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass, field

ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
LATE_REPLY_S = 0.5
ICMP6_FILTER = 1  # the Linux socket option (netinet/icmp6.h)
RECEIVE_BUFFER_BYTES = 4 << 20


@dataclass
class ProbeResult:
    target: str
    interval_ms: float
    sent: int = 0
    received: int = 0
    lost: int = 0
    gap_ms_max: float = 0.0
    rtt_ms_median: float = 0.0
    lost_runs: list[tuple[int, int]] = field(default_factory=list)  # (first seq, count)
    # when each run's first and last probe left (a stalled prober sends late, in a burst)
    lost_runs_sent: list[tuple[float, float]] = field(default_factory=list)
    first_send: float = 0.0


def probe(
    target: str, interval_s: float, duration_s: float, stop_file: str | None = None
) -> ProbeResult:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    sock.setblocking(False)
    _only_echo_replies(sock)
    ident = os.getpid() & 0xFFFF
    sent_at: dict[int, float] = {}
    reply_at: dict[int, float] = {}
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    start = time.monotonic()
    seq = 0
    end = start + duration_s
    while not stopping:
        now = time.monotonic()
        if now >= end or (stop_file and seq % 100 == 0 and os.path.exists(stop_file)):
            break
        due = start + seq * interval_s
        if now >= due:
            packet = struct.pack("!BBHHH", ICMPV6_ECHO_REQUEST, 0, 0, ident, seq & 0xFFFF)
            packet += struct.pack("!I", seq)
            try:
                sock.sendto(packet, (target, 0))
            except OSError:
                pass  # no route yet: counted as lost
            sent_at[seq] = now
            seq += 1
            continue
        _receive(sock, ident, reply_at, max(0.0, due - now))
    drain_until = time.monotonic() + LATE_REPLY_S
    while time.monotonic() < drain_until:
        _receive(sock, ident, reply_at, drain_until - time.monotonic())
    sock.close()
    return _summarise(target, interval_s, sent_at, reply_at)


def _only_echo_replies(sock: socket.socket) -> None:
    """Let the kernel keep every other ICMPv6 message (other probers' replies are still
    ours to skip) off this socket, and give it room for a stall of the prober itself:
    a raw socket that overflows drops replies, which would count as lost probes."""
    blocked = [0xFFFFFFFF] * 8
    blocked[ICMPV6_ECHO_REPLY >> 5] &= ~(1 << (ICMPV6_ECHO_REPLY & 31))
    sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, struct.pack("=8I", *blocked))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)


def _receive(sock: socket.socket, ident: int, reply_at: dict[int, float], timeout: float) -> None:
    ready, _, _ = select.select([sock], [], [], timeout)
    if not ready:
        return
    while True:
        try:
            data = sock.recv(2048)
        except BlockingIOError:
            return
        if len(data) >= 12 and data[0] == ICMPV6_ECHO_REPLY:
            _, _, _, reply_ident, _ = struct.unpack("!BBHHH", data[:8])
            if reply_ident == ident:
                reply_at.setdefault(struct.unpack("!I", data[8:12])[0], time.monotonic())


def _end_run(result: ProbeResult, sent_at: dict[int, float], start: int, length: int) -> None:
    result.lost_runs.append((start, length))
    result.lost_runs_sent.append((sent_at[start], sent_at[start + length - 1]))


def _summarise(
    target: str, interval_s: float, sent_at: dict[int, float], reply_at: dict[int, float]
) -> ProbeResult:
    result = ProbeResult(target, interval_s * 1000, sent=len(sent_at))
    received = sorted(seq for seq in reply_at if seq in sent_at)
    result.received = len(received)
    result.lost = result.sent - result.received
    run_start, run_length = -1, 0
    for seq in range(result.sent):
        if seq in reply_at:
            if run_length:
                _end_run(result, sent_at, run_start, run_length)
            run_length = 0
        else:
            if not run_length:
                run_start = seq
            run_length += 1
    if run_length:
        _end_run(result, sent_at, run_start, run_length)
    times = sorted(reply_at[seq] for seq in received)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    result.gap_ms_max = round(max(gaps, default=0.0) * 1000, 3)
    rtts = sorted(reply_at[seq] - sent_at[seq] for seq in received)
    result.rtt_ms_median = round(rtts[len(rtts) // 2] * 1000, 3) if rtts else 0.0
    result.first_send = min(sent_at.values(), default=0.0)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target")
    parser.add_argument("--interval-ms", type=float, default=1.0)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--stop-file", help="stop early once this file exists")
    args = parser.parse_args(argv)
    result = probe(args.target, args.interval_ms / 1000, args.duration_s, args.stop_file)
    json.dump(asdict(result), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
