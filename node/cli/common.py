"""What every command of `gleaner` shares: errors, the agent's address, output.

A command is a function ``(args) -> exit status``. It reports a failure by
raising `CliError`, which `node.cli.main.main` prints as one line on stderr
with the error's exit status: `EXIT_USAGE` (2) for bad usage or configuration,
`EXIT_FAILURE` (1) for everything else. The commands that talk to a running
agent take the same four options (`add_target`) and call it through `rpc`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

from node.runtime import config
from node.runtime.control import ControlError, call

EXIT_FAILURE = 1
EXIT_USAGE = 2

Command: TypeAlias = Callable[[argparse.Namespace], int]
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class CliError(Exception):
    """A failure to report as one line; `code` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def add_command(
    sub: Subcommands, name: str, func: Command, help_text: str
) -> argparse.ArgumentParser:
    """A subcommand `name` that runs `func`; its help line is also its description."""
    command = sub.add_parser(name, help=help_text, description=help_text)
    command.set_defaults(func=func)
    return command


def add_target(command: argparse.ArgumentParser) -> None:
    """The options of a command that talks to a running agent, and ``--json``."""
    command.add_argument("--config", help="the agent's config file")
    command.add_argument("--state-dir", help="the agent's state directory")
    command.add_argument("--socket", help="the agent's control socket")
    command.add_argument("--json", action="store_true", help="print JSON")


def load_config(args: argparse.Namespace) -> config.Config:
    """The config of ``--config``, with ``--state-dir`` (if the command has it) on top."""
    try:
        loaded = config.load(args.config)
        if getattr(args, "state_dir", None):
            loaded = loaded.replace(node__state_dir=args.state_dir)
    except config.ConfigError as exc:
        raise CliError(f"config error: {exc}", EXIT_USAGE) from None
    return loaded


def socket_path(args: argparse.Namespace) -> Path:
    """The agent's control socket: ``--socket``, else the config's, else the state dir's."""
    if args.socket:
        return Path(args.socket)
    if args.config:
        return load_config(args).control_socket
    if args.state_dir:
        return Path(args.state_dir) / "control.sock"
    return config.load(None).control_socket


def rpc(args: argparse.Namespace, method: str, params: dict[str, Any] | None = None) -> Any:
    """One call to the agent's control socket; its failure is a `CliError`."""
    try:
        return call(socket_path(args), method, params)
    except ControlError as exc:
        raise CliError(str(exc)) from None


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def console() -> Any:
    """A rich console; when piped, wide enough that ids and addresses stay whole."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


def terminal_safe(text: str) -> str:
    """A guest's console text, safe to print: control characters (escape sequences that
    could retitle, recolour or rewrite the terminal) are shown as ``\\xNN``; line ends
    and tabs are kept, and a serial console's CR LF becomes LF."""
    text = text.replace("\r\n", "\n")
    return "".join(
        ch if ch in "\n\t" or (ch.isprintable() and not 0x80 <= ord(ch) < 0xA0) else _escaped(ch)
        for ch in text
    )


def _escaped(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {seconds}s"
    return f"{minutes}m {seconds}s" if minutes else f"{seconds}s"
