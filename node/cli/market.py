"""`gleaner submit | jobs | watch | fetch | ledger`: the job owner's commands.

    gleaner submit [JOB.toml] --image ID|RECIPE --memory MIB --extent S [--segments N]
                   [--redundancy K] [--price-ceiling U] [--deadline S] [--args "..."]
    gleaner jobs                 every job this node owns, a line each
    gleaner watch JOB            live: segments, replicas, winner, payments; a progress bar;
                                 for a job's own program, its latest output lines
    gleaner fetch JOB [-o DIR]   the job's console output (and its result line); with -o,
                                 console.txt, and for a job's own program exit-status
                                 and outputs/ (the files it left in /gleaner/out)
    gleaner ledger               balances, chains and payments, paid and received

A job file is a TOML table of the same settings (``image``, ``memory_mib``,
``vcpus``, ``extent_s``, ``segments``, ``redundancy``, ``price_ceiling``,
``deadline``, ``network``, ``args``); flags override it. ``--image`` takes an
image id, or the path of a recipe, which is built into the agent's image
store first. A job owner's own program adds ``command``, ``entrypoint``,
``env``, ``workdir``, ``inputs``, ``disk_mib`` and ``output_mib``
(node/market/run_requests.py), and its ``image`` is a name or id in the image
library, or an archive or disk to import (node/cli/job_files.py). A job id
may be shortened to any unique prefix, as with git. Every command takes
``--json``.
"""

from __future__ import annotations

import argparse
import shutil
import time
import tomllib
from pathlib import Path
from typing import Any

from node.cli.common import (
    EXIT_USAGE,
    CliError,
    Subcommands,
    add_command,
    add_target,
    console,
    format_duration,
    load_config,
    print_json,
    rpc,
    terminal_safe,
)
from node.cli.job_files import import_image, input_files

TERMINAL = ("completed", "halted", "expired")
WATCH_LINES = 12  # of a program's output under the table


def add_commands(sub: Subcommands) -> None:
    submit = add_command(
        sub, "submit", cmd_submit, "inject a VM job into the swarm; prints its job id"
    )
    add_target(submit)
    submit.add_argument("job_file", nargs="?", type=Path, help="a TOML file of job settings")
    submit.add_argument("--image", help="image id, or a recipe file to build")
    submit.add_argument("--memory", type=int, dest="memory_mib", help="guest memory, MiB")
    submit.add_argument("--vcpus", type=int)
    submit.add_argument("--extent", type=int, dest="extent_s", help="guest vCPU-s per segment")
    submit.add_argument("--segments", help="how many, or 'until-poweroff' (the default)")
    submit.add_argument("--redundancy", "-k", type=int, help="replicas per segment")
    submit.add_argument("--price-ceiling", type=int, dest="price_ceiling", help="units/segment")
    submit.add_argument("--deadline", type=int, help="seconds from now (default: a day)")
    submit.add_argument("--network", action="store_true", default=None)
    submit.add_argument("--args", help="kernel command-line additions (the workload's settings)")
    add_target(add_command(sub, "jobs", cmd_jobs, "list the jobs this node owns"))
    watch = add_command(
        sub, "watch", cmd_watch, "follow a job: segments, replicas, winners, payments"
    )
    add_target(watch)
    watch.add_argument("job")
    watch.add_argument("--once", action="store_true", help="print the table once and exit")
    fetch = add_command(
        sub, "fetch", cmd_fetch, "get a job's output: its console, segment by segment"
    )
    add_target(fetch)
    fetch.add_argument("job")
    fetch.add_argument(
        "-o", "--output", type=Path, help="write console.txt (and exit-status, outputs/) here"
    )
    add_target(add_command(sub, "ledger", cmd_ledger, "balances, hash chains and payments"))


def job_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    base = Path.cwd()
    if args.job_file is not None:
        try:
            settings = tomllib.loads(args.job_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CliError(f"{args.job_file}: {exc}", EXIT_USAGE) from None
        settings = settings.get("job", settings)
        base = args.job_file.resolve().parent
    if "inputs" in settings:
        settings["inputs"] = input_files(settings["inputs"], base)
    for name in ("image", "memory_mib", "vcpus", "extent_s", "redundancy", "price_ceiling"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.network is not None:
        settings["network"] = True
    if args.args is not None:
        settings["args"] = args.args
    if args.segments is not None:
        settings["segments"] = (
            args.segments if args.segments == "until-poweroff" else _integer(args.segments)
        )
    if args.deadline is not None:
        settings["deadline"] = int(time.time()) + args.deadline
    settings.setdefault("vcpus", 1)
    settings.setdefault("redundancy", 2)
    settings.setdefault("price_ceiling", 100)
    image = settings.get("image")
    if isinstance(image, str) and (base / image).is_file():
        path = base / image
        if path.suffix == ".toml":
            settings["image"] = _build_image(args, path)
        else:
            loaded = load_config(args)
            settings["image"] = import_image(path, loaded.library, loaded.state_dir)
    return settings


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CliError(
            f"--segments: expected a number or until-poweroff, got {text!r}", EXIT_USAGE
        ) from None


def _build_image(args: argparse.Namespace, recipe: Path) -> str:
    from segments.image.store import ImageError, build

    loaded = load_config(args)
    store = Path(loaded["vm.image_store"] or loaded.state_dir / "images")
    try:
        return build(recipe, store).id
    except ImageError as exc:
        raise CliError(f"building {recipe}: {exc}") from None


def cmd_submit(args: argparse.Namespace) -> int:
    job = rpc(args, "job_submit", {"job": job_settings(args)})
    if args.json:
        print_json(job)
    else:
        print(job["job_id"])
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    jobs = rpc(args, "jobs")
    if args.json:
        print_json(jobs)
        return 0
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("job", "image", "state", "segments", "k", "paid", "age"):
        table.add_column(column, no_wrap=True)
    now = time.time()
    for job in jobs:
        total = job["segments"] if job["segments"] is not None else "?"
        table.add_row(
            job["job_id"][:12],
            job["image"][:16],
            job["state"],
            f"{job['committed']}/{total}",
            str(job["k"]),
            str(job["paid_units"]),
            format_duration(now - job["submitted"]),
        )
    console().print(table)
    return 0


def segment_table(detail: dict[str, Any]) -> Any:
    """The per-segment table of ``watch`` (and of the demo's summary)."""
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("segment", "try", "replicas", "first done", "winner", "time", "paid"):
        table.add_column(column, no_wrap=True)
    for row in detail["rows"]:
        done = row["completions"]
        took = (row["committed_at"] or time.time()) - row["offered_at"]
        table.add_row(
            str(row["segment"]),
            str(row["attempts"]),
            " ".join(node[:8] for node in row["replicas"]) or "-",
            done[0]["node"][:8] if done else "-",
            (row["winner"] or "-")[:8],
            f"{took:.1f} s",
            str(row["paid_units"]) if row["paid_to"] else "-",
        )
    return table


def cmd_watch(args: argparse.Namespace) -> int:
    if args.json or args.once:
        detail = rpc(args, "job", {"job": args.job})
        print_json(detail) if args.json else console().print(segment_table(detail))
        return 0
    from rich.console import Group
    from rich.live import Live
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.text import Text

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    task = progress.add_task("segments", total=None)
    seen, tail = -1, ""
    with Live(console=console(), refresh_per_second=4) as live:
        while True:
            detail = rpc(args, "job", {"job": args.job})
            progress.update(
                task,
                total=detail["segments"],
                completed=detail["committed"],
                description=f"job {detail['job_id'][:12]} {detail['state']}",
            )
            if detail.get("own_program") and detail["committed"] != seen:
                seen = detail["committed"]  # the program's output, as segments commit
                console_text = rpc(args, "job_output", {"job": args.job})["console"]
                tail = "\n".join(terminal_safe(console_text).splitlines()[-WATCH_LINES:])
            parts: list[Any] = [progress, segment_table(detail)]
            if tail:
                parts.append(Text(tail))
            live.update(Group(*parts))
            if detail["state"] in TERMINAL:
                break
            time.sleep(0.5)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    output = rpc(args, "job_output", {"job": args.job})
    own = output.get("own_program", False)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "console.txt").write_text(output["console"])
        if own and output["outputs"] is not None:
            status = output["exit_status"]
            (args.output / "exit-status").write_text(f"{'' if status is None else status}\n")
            shutil.copytree(output["outputs"], args.output / "outputs", dirs_exist_ok=True)
    if args.json:
        print_json(output)
    elif args.output is None:
        print(terminal_safe(output["console"]), end="")
    elif own:
        files = len(output["files"])
        status = output["exit_status"] if output["outputs"] is not None else "(not yet)"
        print(f"exit status {status}; {files} output file(s) in {args.output}/outputs")
    else:
        print(f"result: {output['result'] or '(none yet)'}; console in {args.output}/console.txt")
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    ledger = rpc(args, "ledger")
    if args.json:
        print_json(ledger)
        return 0
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("side", "counterparty", "chains", "issued", "released", "accepted"):
        table.add_column(column, no_wrap=True)
    for side in ("payer", "payee"):
        for b in ledger[side]["balances"]:
            table.add_row(
                "paid to" if side == "payer" else "paid by",
                b["counterparty"][:12],
                str(b["chains"]),
                str(b["issued"]),
                str(b["released"]),
                str(b["accepted"]),
            )
    console().print(table)
    return 0
