"""LAN discovery over mDNS (python-zeroconf).

Each agent registers one service ``<short node id>._gleaner._udp.local.`` whose
TXT record carries the agent's signed peer record, cut into chunks that fit
TXT strings (``r0``, ``r1``, … of at most 240 bytes). Browsers reassemble the
chunks and hand the blob to the agent, which verifies it like any other record:
mDNS is an untrusted channel, the signature is what counts.

Instance names are derived from node ids, which are unique by construction, so
registration skips the RFC 6762 probing round (``cooperating_responders``): it
would only delay discovery by about 1.6 s to detect a collision that cannot
happen. Zeroconf binds only to the agent's underlay address, IPv4, so it never
multicasts on other interfaces; the agent does not start it at all when
``network.mdns`` is off.

zeroconf runs its own threads; ``on_record`` is called from them and must be
thread-safe (the agent passes a function that hands the blob to trio).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("gleaner.discovery")

SERVICE_TYPE = "_gleaner._udp.local."
CHUNK_BYTES = 240
MAX_CHUNKS = 16
LOOKUP_TIMEOUT_MS = 1500

RecordCallback = Callable[[bytes], None]


def record_to_txt(blob: bytes) -> dict[str, bytes]:
    chunks = [blob[i : i + CHUNK_BYTES] for i in range(0, len(blob), CHUNK_BYTES)]
    if len(chunks) > MAX_CHUNKS:
        raise ValueError(f"record of {len(blob)} bytes does not fit in mDNS TXT")
    properties = {f"r{index}": chunk for index, chunk in enumerate(chunks)}
    properties["v"] = b"1"
    return properties


def txt_to_record(properties: dict[bytes, bytes | None]) -> bytes | None:
    """Reassemble a record from TXT properties; None if they are not ours or incomplete."""
    if properties.get(b"v") != b"1":
        return None
    chunks = []
    for index in range(MAX_CHUNKS):
        chunk = properties.get(f"r{index}".encode())
        if chunk is None:
            break
        chunks.append(chunk)
    return b"".join(chunks) or None


class Discovery(Protocol):
    def start(self, instance: str, blob: bytes, port: int) -> None: ...
    def update(self, blob: bytes) -> None: ...
    def stop(self) -> None: ...


# Builds a discovery bound to one underlay IPv4 address, calling back with each blob.
DiscoveryFactory = Callable[[str, RecordCallback], Discovery]


class MdnsDiscovery:
    """The real thing: python-zeroconf bound to one IPv4 underlay address."""

    def __init__(self, bind_address: str, on_record: RecordCallback) -> None:
        self.bind_address = bind_address
        self.on_record = on_record
        self._zc: Any = None
        self._browser: Any = None
        self._info: Any = None
        self._lock = threading.Lock()
        self.discovered = 0
        self.bad_entries = 0

    def start(self, instance: str, blob: bytes, port: int) -> None:
        from zeroconf import IPVersion, Zeroconf

        self._zc = Zeroconf(interfaces=[self.bind_address], ip_version=IPVersion.V4Only)
        try:
            self._register(instance, blob, port)
        except BaseException:
            self.stop()  # close its sockets and threads: nothing half started stays
            raise

    def _register(self, instance: str, blob: bytes, port: int) -> None:
        from zeroconf import ServiceBrowser, ServiceInfo

        self._info = ServiceInfo(
            SERVICE_TYPE,
            f"{instance}.{SERVICE_TYPE}",
            addresses=[_packed_ipv4(self.bind_address)],
            port=port,
            properties=record_to_txt(blob),
            server=f"{instance}.local.",
        )
        self._zc.register_service(self._info, cooperating_responders=True)
        self._own_name = self._info.name
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])

    def update(self, blob: bytes) -> None:
        from zeroconf import ServiceInfo

        with self._lock:
            if self._zc is None:
                return
            info = self._info
            self._info = ServiceInfo(
                SERVICE_TYPE,
                info.name,
                addresses=info.addresses,
                port=info.port,
                properties=record_to_txt(blob),
                server=info.server,
            )
            self._zc.update_service(self._info)

    def stop(self) -> None:
        with self._lock:
            zc, self._zc = self._zc, None
        if zc is None:
            return
        if self._browser is not None:
            self._browser.cancel()
        try:
            zc.unregister_all_services()
        finally:
            zc.close()

    def _on_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        from zeroconf import ServiceStateChange

        if name == self._own_name or state_change is ServiceStateChange.Removed:
            return
        info = zeroconf.get_service_info(service_type, name, timeout=LOOKUP_TIMEOUT_MS)
        if info is None:
            return
        blob = txt_to_record(info.properties)
        if blob is None:
            self.bad_entries += 1
            return
        self.discovered += 1
        self.on_record(blob)


def _packed_ipv4(address: str) -> bytes:
    import ipaddress

    return ipaddress.IPv4Address(address).packed
