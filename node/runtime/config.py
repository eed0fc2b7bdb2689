"""Agent configuration: one TOML file, every field defaulted and validated at start.

Every setting is declared once in ``SETTINGS`` with its section, type, default and
check. Loading reads the file, refuses unknown sections and keys (a typo must not
silently fall back to a default), checks each value, and returns a frozen
``Config``. Any problem raises ``ConfigError`` whose message is one line naming
the field (``network.listen: …``), which the CLI prints without a traceback.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.base.identity import NodeId
from node.base.records import parse_endpoint
from node.policy.machine import PolicyConfig, parse_window

LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """The configuration is unusable; the message names the field and the reason."""


def default_state_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/gleaner"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "gleaner")


@dataclass(frozen=True, slots=True)
class Setting:
    section: str
    name: str
    kind: type
    default: Callable[[], Any]
    check: Callable[[Any], str | None] = lambda value: None

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"


def _endpoint(allow_port_zero: bool) -> Callable[[Any], str | None]:
    def check(value: str) -> str | None:
        probe = value
        if allow_port_zero and value.endswith(":0"):
            probe = value[:-2] + ":1"
        try:
            parse_endpoint(probe)
        except ValueError:
            return f"expected an IP address and port like 198.51.100.1:7946, got {value!r}"
        return None

    return check


def _endpoint_list(value: list[Any]) -> str | None:
    for item in value:
        if not isinstance(item, str):
            return f"expected a list of host:port strings, found {item!r}"
        problem = _endpoint(False)(item)
        if problem:
            return problem
    return None


def _key_list(value: list[Any]) -> str | None:
    for item in value:
        try:
            NodeId.parse(item if isinstance(item, str) else "")
        except ValueError:
            return f"expected a list of node ids (52 base32 characters), found {item!r}"
    return None


def _window_list(value: list[Any]) -> str | None:
    for item in value:
        try:
            parse_window(item if isinstance(item, str) else "")
        except ValueError:
            return f'expected a list of local time windows like "22:00-07:00", found {item!r}'
    return None


def _range(low: int, high: int) -> Callable[[Any], str | None]:
    def check(value: int) -> str | None:
        if not low <= value <= high:
            return f"must be between {low} and {high}, got {value}"
        return None

    return check


def _float_range(low: float, high: float) -> Callable[[Any], str | None]:
    def check(value: float) -> str | None:
        if not low <= value <= high:
            return f"must be between {low:g} and {high:g}, got {value:g}"
        return None

    return check


def _migration_uri(value: str) -> str | None:
    """ "" or a URI another host may be handed for a live migration (node/market/handoff.py)."""
    from node.base.wire import RemoteProtocolError
    from node.market.handoff import check_migration_uri  # the market's modules, only when set

    if not value:
        return None
    try:
        check_migration_uri(value)
    except RemoteProtocolError as exc:
        return f"{exc} (qemu+tls://HOST/system, qemu+tcp://HOST/system or qemu+unix)"
    return None


def _nonempty(limit: int) -> Callable[[Any], str | None]:
    def check(value: str) -> str | None:
        if not value or len(value) > limit:
            return f"must be 1 to {limit} characters"
        return None

    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"

    return check


SETTINGS: tuple[Setting, ...] = (
    Setting("node", "state_dir", str, default_state_dir, _nonempty(4096)),
    Setting("node", "swarm_id", str, lambda: "gleaner", _nonempty(64)),
    Setting("node", "name", str, lambda: "", lambda v: None if len(v) <= 64 else "too long"),
    Setting("network", "listen", str, lambda: "0.0.0.0:7946", _endpoint(True)),
    Setting("network", "advertise", list, list, _endpoint_list),
    Setting("network", "bootstrap", list, list, _endpoint_list),
    Setting("network", "mdns", bool, lambda: True),
    Setting("network", "wireguard_port", int, lambda: 51820, _range(1, 65535)),
    Setting("network", "block_port", int, lambda: 7947, _range(0, 65535)),
    Setting("overlay", "enabled", bool, lambda: True),
    Setting("overlay", "eager_limit", int, lambda: 64, _range(0, 100_000)),
    Setting("overlay", "idle_expiry_s", int, lambda: 120, _range(5, 86400)),
    Setting("overlay", "move_linger_s", float, lambda: 2.0, _float_range(0.0, 60.0)),
    Setting("membership", "probe_interval_s", float, lambda: 0.5, _float_range(0.05, 60.0)),
    Setting("membership", "gossip_interval_s", float, lambda: 0.2, _float_range(0.01, 60.0)),
    Setting("vm", "libvirt_uri", str, lambda: "qemu:///system", _nonempty(4096)),
    Setting("vm", "image_store", str, lambda: "", lambda v: None),
    # Where images job owners import (and images taken from other hosts' jobs) are
    # kept ("" = the image store): a testbed host gives each host its own.
    Setting("vm", "library", str, lambda: "", lambda v: None),
    # The image store's blocks: images taken from other hosts' jobs are evicted, least
    # recently used first, to stay under this; images imported here (named) never are.
    Setting("vm", "image_cache_mib", int, lambda: 20_480, _range(64, 1 << 30)),
    # Where other hosts reach this host's libvirt to live-migrate a guest here ("" =
    # libvirt_uri, which only hosts on the same machine can use: the testbed).
    Setting("vm", "migration_uri", str, lambda: "", _migration_uri),
    # What this host lends to the swarm (the bidder never promises more); 0 = all it has.
    Setting("host", "vcpus", int, lambda: 0, _range(0, 4096)),
    Setting("host", "memory_mib", int, lambda: 0, _range(0, 1 << 24)),
    Setting("host", "disk_mib", int, lambda: 10_240, _range(0, 1 << 30)),
    Setting("host", "replicas", int, lambda: 2, _range(0, 64)),
    Setting("host", "price_floor", int, lambda: 1, _range(1, 1 << 20)),
    # The volunteer's rules (node/policy/machine.py): when Gleaner may run and bid here.
    Setting("policy", "max_other_load", float, lambda: 0.5, _float_range(0.0, 1.0)),
    Setting("policy", "input_idle_s", float, lambda: 0.0, _float_range(0.0, 86400.0)),
    Setting("policy", "allowed_hours", list, list, _window_list),
    Setting("policy", "run_on_battery", bool, lambda: False),
    Setting("policy", "grace_s", float, lambda: 60.0, _float_range(0.0, 86400.0)),
    Setting("policy", "resume_quiet_s", float, lambda: 5.0, _float_range(0.0, 3600.0)),
    Setting("policy", "cpu_share", float, lambda: 1.0, _float_range(0.01, 1.0)),
    Setting("policy", "sample_interval_s", float, lambda: 0.5, _float_range(0.1, 60.0)),
    # "host": the whole machine is the volunteer's; "netns": only this network
    # namespace (a testbed host, one namespace among several on one machine).
    Setting("policy", "scope", str, lambda: "host", _one_of(("host", "netns"))),
    Setting("market", "bid_window_s", float, lambda: 2.0, _float_range(0.05, 600.0)),
    Setting("market", "run_grace_s", float, lambda: 60.0, _float_range(1.0, 86400.0)),
    Setting("market", "verify_timeout_s", float, lambda: 60.0, _float_range(1.0, 3600.0)),
    Setting("market", "chain_length", int, lambda: 10_000, _range(16, 1_000_000)),
    Setting("market", "accept_self_issued", bool, lambda: True),
    Setting("market", "trusted_issuers", list, list, _key_list),
    Setting("control", "socket", str, lambda: ""),
    Setting("record", "lifetime_s", int, lambda: 3600, _range(60, 7 * 86400)),
    Setting("log", "level", str, lambda: "info", _one_of(LOG_LEVELS)),
)


@dataclass(frozen=True, slots=True)
class Config:
    values: dict[str, Any]
    source: str

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @property
    def state_dir(self) -> Path:
        return Path(self.values["node.state_dir"])

    @property
    def image_store(self) -> Path:
        """Where this node's guest images are: ``vm.image_store``, else <state_dir>/images."""
        explicit = self.values["vm.image_store"]
        return Path(explicit) if explicit else self.state_dir / "images"

    @property
    def library(self) -> Path:
        """This node's image library (imported images): ``vm.library``, else the image store."""
        explicit = self.values["vm.library"]
        return Path(explicit) if explicit else self.image_store

    @property
    def control_socket(self) -> Path:
        explicit = self.values["control.socket"]
        return Path(explicit) if explicit else self.state_dir / "control.sock"

    def replace(self, **overrides: Any) -> Config:
        """A copy with some fields set, by dotted key with '.' written as '__'."""
        values = dict(self.values)
        for name, value in overrides.items():
            key = name.replace("__", ".")
            if key not in values:
                raise ConfigError(f"{key}: no such setting")
            values[key] = value
        return validate(values, self.source)


def policy_config(config: Config) -> PolicyConfig:
    """The host policy core's rules from ``[policy]``, and the caps from ``[host]``."""
    return PolicyConfig(
        max_other_load=config["policy.max_other_load"],
        input_idle_s=config["policy.input_idle_s"],
        allowed_hours=tuple(parse_window(text) for text in config["policy.allowed_hours"]),
        run_on_battery=config["policy.run_on_battery"],
        grace_s=config["policy.grace_s"],
        resume_quiet_s=config["policy.resume_quiet_s"],
        cpu_share=config["policy.cpu_share"],
        vcpus=config["host.vcpus"],
        memory_mib=config["host.memory_mib"],
        disk_mib=config["host.disk_mib"],
    )


def load(path: str | os.PathLike[str] | None) -> Config:
    """Load and validate a config file; `None` gives all defaults."""
    if path is None:
        return validate({}, "defaults")
    source = str(path)
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    return from_document(document, source)


def from_document(document: dict[str, Any], source: str) -> Config:
    known_sections = {s.section for s in SETTINGS}
    flat: dict[str, Any] = {}
    for section, table in document.items():
        if section not in known_sections:
            raise ConfigError(
                f"{section}: unknown section (known: {', '.join(sorted(known_sections))})"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{section}: expected a table like [{section}]")
        for name, value in table.items():
            flat[f"{section}.{name}"] = value
    return validate(flat, source)


def validate(flat: dict[str, Any], source: str) -> Config:
    by_key = {s.key: s for s in SETTINGS}
    for key in flat:
        if key not in by_key:
            raise ConfigError(f"{key}: unknown setting")
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        value = flat[setting.key] if setting.key in flat else setting.default()
        if not _has_kind(value, setting.kind):
            raise ConfigError(
                f"{setting.key}: expected {_kind_name(setting.kind)}, "
                f"got {_kind_name(type(value))} "
                f"{value!r}"
            )
        problem = setting.check(value)
        if problem:
            raise ConfigError(f"{setting.key}: {problem}")
        values[setting.key] = float(value) if setting.kind is float else value
    return Config(values, source)


def _has_kind(value: Any, kind: type) -> bool:
    if kind is int:
        return type(value) is int
    if kind is float:
        return type(value) in (int, float)
    return isinstance(value, kind)


def _kind_name(kind: type) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    return {**names, list: "a list"}.get(kind, kind.__name__)
