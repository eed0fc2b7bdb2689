"""Verifying a completed segment: its console must add up, and its checkpoint must run on.

Theory of operation
-------------------
The market pays the first replica whose completion *verifies*: "a completion
must restore and show guest progress before it is paid". A completion names
a checkpoint manifest (``segments.vm.replica``: the save file's parts plus the
run's console as the file ``console``), a 32-byte progress digest
(``segments.vm.progress``) and whether the guest powered off (``halted``). The
verifier has fetched the manifest's blocks into its store and knows the
previous segment's progress (``base``; None for segment 0). It checks, in
order, and stops at the first failure with a one-line reason:

a. **The claim is the console's.** The manifest holds a console file, and
   ``encode_progress`` of its text equals the claimed digest. The claim is
   then no more than a summary of a file the replica signed.
b. **The console continues the chain from base.** Its ``gleaner-progress``
   lines are one unbroken run (``workload.check_continuity``) whose first line
   is base step + 1 with state ``next_state(base state)``; for segment 0 the
   run starts at step 1 from the seed of its ``gleaner-start`` line (which, if
   the job's command line names a seed or a step count, must match it). A
   restored guest may first print the tail of a line the previous segment's
   save cut short; such a tail is accepted as that line when it is exactly
   the end of what that line must be. A console without progress lines passes
   only where base had none either (or the guest powered off right after
   base's last step, which (d) then checks).
c. **The checkpoint is alive** (not halted). The save file is rebuilt from
   the blocks (only ``ram``/``rest`` or ``memory``, never the console) and
   restored with this host's kernel, initrd and a fresh serial log in a work
   directory of its own, resumed if paused, and watched (polling, at most
   ``timeout_s``): the first thing the guest prints past the checkpoint must
   be step claimed + 1 with state ``next_state(claimed state)`` (or, if the
   claimed step was the job's last, a ``gleaner-result`` equal to the claimed
   state). The restored guest's output is read as the continuation of the
   checkpoint's console, so a line the save cut in two is read whole. A guest
   that never printed progress must instead be running, with its vCPU time
   growing. The domain is destroyed (and undefined, unless this host had
   defined that name before), and the save file and work directory deleted,
   on every path.
d. **A halted guest finished the chain** (halted). The checkpoint holds no
   save file, and the console has a ``gleaner-result`` line equal to the
   chain's state at its last step. A guest without progress lines is
   accepted as it is: there is nothing to check.

Why (c) matters: (a) and (b) only read text the replica wrote. Restoring
proves the checkpoint is a live guest whose *RAM* holds the claimed state: the
next state is computed inside the guest from the one in its memory, so a
console that ran ahead of (or behind) the RAM image is caught.

What a cheating host could still do, and what it costs them:

* **Forge the demo's work.** The chain is cheap outside a VM; a host could
  compute it natively and patch a guest's RAM (the shell's variables) to the
  claimed step, then forge a matching console. That takes reverse-engineering
  the guest's memory for every job, and real workloads rarely have a chain
  that is cheap outside the guest. Replaying an older checkpoint (the base
  itself) fails (c): it continues from its own step, not the claimed one.
* **Do little work on a guest without progress lines.** Only "it restores and
  runs" is checked, so a host can return a checkpoint after a fraction of the
  extent. It is paid for one segment; the job loses that segment's work but
  continues from a valid checkpoint. Reputation and k replicas bound this.
* **Claim halted.** Nothing is restored; a demo console must still end with the
  right result (forgeable as above), a guest without progress lines is taken
  on trust. The job then ends early; the owner notices a missing result.
* **Waste the verifier's time.** Bounded: the console is read only up to
  ``MAX_CONSOLE_BYTES``, the restored guest runs at most ``timeout_s``.
* **A hostile save file.** Restoring trusts the domain XML inside the save
  file (its devices), as every replica's restore does; the kernel, initrd,
  serial log and tap are replaced, and the disks are rebuilt from this host's
  spec (``VerifySpec.disks``: the checkpoint's writable disks are restored
  into copies of the verifier's own, each the size this host prepared).
  Checking the rest of that XML against an allow-list is not done here.

Errors: a checkpoint that fails a check is a ``Verdict`` with ``ok`` false
(the replica's fault). A failure of this host (a block missing or corrupt in
its store, its libvirtd unreachable, a domain of the job's name already
running here) raises ``VerifyError``: the replica is not to blame. A
malformed ``base`` (the caller's own record) raises ``ValueError``.

Blocking (libvirt, files, sleeps): the agent runs it in a worker thread.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from segments.image.workload import (
    PROGRESS,
    RESULT,
    START,
    STATE_HEX,
    ContinuityError,
    check_continuity,
    next_state,
    parse_progress,
    parse_result,
)
from segments.store.blocks import BlockStore, BlockStoreError
from segments.store.manifest import Manifest
from segments.vm.progress import Progress, console_text, decode_progress, encode_progress
from segments.vm.replica import (
    CONSOLE_FILE,
    CheckpointDiskError,
    ReplicaError,
    rebuild_save_file,
    restore_disks,
    save_file_parts,
)
from segments.vm.runtime import ACTIVE_STATES, Disk, VmError, VmRuntime, VmSpec, VmState

POLL_S = 0.1
CPU_GROWTH_S = 0.1  # vCPU time a guest without progress lines must add (the clock ticks 10 ms)
MAX_CONSOLE_BYTES = 64 * 2**20  # about 1.7 M progress lines
TAIL_CHARS = 256  # of the checkpoint's console, read before the restored guest's output
VERIFY_VM_NAME = "gleaner-verify"  # only the spec's; a restored domain keeps its saved name


class VerifyError(Exception):
    """Verification could not be carried out on this host; the checkpoint is not to blame."""


class _Rejected(Exception):
    """A check failed; the message is the verdict's reason."""


@dataclass(frozen=True, slots=True)
class VerifySpec:
    """This host's view of the job's VM: what a restore needs, and where to work."""

    kernel: Path
    initrd: Path
    cmdline: str
    memory_mb: int
    vcpus: int
    work_dir: Path  # a fresh directory for each verification is made inside it
    # The job's domain name (SegmentRun.vm_name). Give it: a restore keeps the saved
    # name, so without it a domain of that name running here (this host's own
    # replica) makes the restore fail and the verdict blame the checkpoint.
    vm_name: str | None = None
    tap: str | None = None  # a tap name for a checkpoint with a NIC (else its saved name)
    # The job's disks here; the writable ones are filled from the checkpoint, in copies.
    disks: tuple[Disk, ...] = ()


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str  # one line: what failed, or what was seen
    new_step: int  # the step the verification saw the guest reach (0: none)
    claimed_step: int  # the step the completion claimed (0: none, or unreadable)
    wall_s: float


@dataclass(frozen=True, slots=True)
class _Chain:
    """What checks (a) and (b) established about the checkpoint's console."""

    text: str
    claimed: Progress
    last_step: int  # the chain's last step: the last line's, else base's (0: none)
    last_state: str | None  # the chain's state there (the seed at step 0), None if unknown
    has_start: bool  # the console holds a gleaner-start line


def verify_checkpoint(
    runtime: VmRuntime,
    store: BlockStore,
    spec: VerifySpec,
    manifest: Manifest,
    claimed: bytes,
    base: bytes | None,
    halted: bool,
    timeout_s: float,
) -> Verdict:
    """Check a completion's checkpoint (see the module docstring); blocking."""
    started = time.monotonic()
    base_progress = decode_progress(base) if base is not None else None
    claimed_step = 0
    try:
        chain = _check_claim(store, manifest, claimed)
        claimed_step = chain.claimed.step
        chain = _check_continues(chain, base_progress, halted, spec.cmdline)
        if halted:
            new_step, reason = _check_finished(chain, manifest)
        else:
            new_step, reason = _check_alive(runtime, store, spec, manifest, chain, timeout_s)
    except _Rejected as exc:
        return Verdict(False, str(exc), 0, claimed_step, time.monotonic() - started)
    return Verdict(True, reason, new_step, claimed_step, time.monotonic() - started)


# -- (a) the claim is the console's ----------------------------------------------------


def _check_claim(store: BlockStore, manifest: Manifest, claimed: bytes) -> _Chain:
    try:
        claim = decode_progress(claimed)
    except ValueError as exc:
        raise _Rejected(f"claimed progress: {exc}") from None
    text = console_text(_read_console(store, manifest))
    try:
        actual = encode_progress(text)
    except ValueError as exc:
        raise _Rejected(f"console: {exc}") from None
    if actual != bytes(claimed):
        shown = decode_progress(actual)
        if (shown.step, shown.state) != (claim.step, claim.state):
            raise _Rejected(
                f"claimed step {claim.step} state {claim.state}, "
                f"the console shows step {shown.step} state {shown.state}"
            )
        raise _Rejected("the claimed console digest is not the console file's")
    return _Chain(text, claim, claim.step, claim.state, _start(text) is not None)


def _read_console(store: BlockStore, manifest: Manifest) -> bytes:
    """The checkpoint's console file from the store; _Rejected if absent or oversized."""
    try:
        entry = manifest.file(CONSOLE_FILE)
    except KeyError:
        raise _Rejected("the checkpoint has no console file") from None
    if entry.size > MAX_CONSOLE_BYTES:
        raise _Rejected(f"the console is {entry.size} bytes, more than {MAX_CONSOLE_BYTES}")
    try:
        return store.read_file(manifest, CONSOLE_FILE)
    except BlockStoreError as exc:
        raise VerifyError(f"reading the console of the checkpoint: {exc}") from exc


# -- (b) the console continues the chain from base -------------------------------------


def _check_continues(chain: _Chain, base: Progress | None, halted: bool, cmdline: str) -> _Chain:
    text = chain.text
    lines = parse_progress(text)
    start = _start(text)
    if start is not None:
        _check_job_start(start, cmdline)
    seed = start[1] if start is not None else None
    if base is None:
        if lines and start is None:
            raise _Rejected("segment 0 printed progress but no gleaner-start line")
        after_step, after_state = 0, seed
    else:
        if base.step > 0 and start is not None:
            raise _Rejected(f"the guest started over (gleaner-start after base step {base.step})")
        after_step, after_state = base.step, base.state if base.step else seed
        after_step, after_state = _past_cut_line(text, lines, after_step, after_state)
    if not lines:
        if after_step > 0 and not halted:
            raise _Rejected(f"no gleaner-progress line after base step {after_step}")
        return _replace_chain(chain, after_step, after_state)
    try:
        check_continuity(lines, after_step=after_step)
    except ContinuityError as exc:
        raise _Rejected(f"console: {exc}") from None
    first_step, first_state = lines[0]
    if after_state is not None and first_state != next_state(after_state):
        raise _Rejected(
            f"console: step {first_step} state {first_state} does not follow "
            f"step {after_step} state {after_state}"
        )
    return chain


def _start(text: str, pos: int = 0) -> tuple[int, str] | None:
    """(steps, seed) of the first whole ``gleaner-start`` line from `pos` (or ending past it).

    Unlike a progress line, whose state has a fixed length, a start line cut
    at the end of the text still matches (with part of its seed), so one
    that does not end in a line break is not taken.
    """
    for match in START.finditer(text, max(0, pos - TAIL_CHARS)):
        if match.end() <= pos:
            continue
        if match.group(0).endswith("\r") or text.startswith("\n", match.end()):
            return int(match.group(1)), match.group(2)
        return None
    return None


def _check_job_start(start: tuple[int, str], cmdline: str) -> None:
    """The gleaner-start line must name the job's steps and seed, where its cmdline sets them."""
    steps, seed = start
    wanted_seed = _cmdline_setting(cmdline, "seed")
    if wanted_seed is not None and seed != wanted_seed:
        raise _Rejected(f"the guest ran seed {seed!r}, the job's is {wanted_seed!r}")
    wanted_steps = _cmdline_setting(cmdline, "steps")
    if wanted_steps is not None and wanted_steps.isdigit() and steps != int(wanted_steps):
        raise _Rejected(f"the guest ran {steps} steps, the job's are {wanted_steps}")


def _cmdline_setting(cmdline: str, key: str) -> str | None:
    """The last ``gleaner.KEY=VALUE`` of a kernel command line (the guest reads them in order)."""
    value = None
    for arg in cmdline.split():
        if arg.startswith(f"gleaner.{key}="):
            value = arg.partition("=")[2]
    return value


_LINE_TAIL_STATE = re.compile(rf"[0-9a-f]{{0,{STATE_HEX}}}")


def _past_cut_line(
    text: str, lines: list[tuple[int, str]], after_step: int, after_state: str | None
) -> tuple[int, str | None]:
    """Where the console's chain starts, counting a first line the previous save cut short.

    A restored guest may first print the tail of line ``after_step + 1``. That
    tail is taken as the line only if it is exactly how that line must end
    (with an unknown state, any 16 hex digits) and the first whole line, if
    any, is the one after it.
    """
    if lines and lines[0][0] != after_step + 2:
        return after_step, after_state
    if not lines and after_state is None:
        return after_step, after_state  # a lone tail of an unknown state proves nothing
    head = text.split("\n", 1)[0].rstrip("\r")
    if not head or PROGRESS.search(head):
        return after_step, after_state
    step = after_step + 1
    if after_state is not None:
        state: str | None = next_state(after_state)
        whole = f"gleaner-progress {step} {state}"
        fits = whole.endswith(head) and len(head) < len(whole)
    else:
        state = None
        prefix = f"gleaner-progress {step} "
        hex_tail = head[-STATE_HEX:]
        fits = bool(_LINE_TAIL_STATE.fullmatch(hex_tail)) and (
            len(head) <= STATE_HEX or prefix.endswith(head[:-STATE_HEX])
        )
    return (step, state) if fits else (after_step, after_state)


def _replace_chain(chain: _Chain, last_step: int, last_state: str | None) -> _Chain:
    return _Chain(chain.text, chain.claimed, last_step, last_state, chain.has_start)


# -- (d) a halted guest finished the chain ---------------------------------------------


def _check_finished(chain: _Chain, manifest: Manifest) -> tuple[int, str]:
    if save_file_parts(manifest):
        raise _Rejected("the guest is said to have powered off, yet the checkpoint holds a save")
    if chain.last_state is None:
        return chain.last_step, "powered off; no progress lines to check"
    result = parse_result(chain.text)
    if result is None:
        head = chain.text.split("\n", 1)[0].rstrip("\r")
        whole = f"gleaner-result {chain.last_state}"
        if not chain.claimed.step and head and whole.endswith(head) and len(head) < len(whole):
            return chain.last_step, f"powered off; result at step {chain.last_step} (cut line)"
        raise _Rejected(f"powered off without a gleaner-result line (step {chain.last_step})")
    if result != chain.last_state:
        raise _Rejected(
            f"gleaner-result {result} is not the chain's state {chain.last_state} "
            f"at step {chain.last_step}"
        )
    return chain.last_step, f"powered off; result matches step {chain.last_step}"


# -- (c) the checkpoint is alive -------------------------------------------------------


def _check_alive(
    runtime: VmRuntime,
    store: BlockStore,
    spec: VerifySpec,
    manifest: Manifest,
    chain: _Chain,
    timeout_s: float,
) -> tuple[int, str]:
    if not save_file_parts(manifest):
        held = ", ".join(sorted(entry.name for entry in manifest.files))
        raise _Rejected(f"the guest did not power off, yet the checkpoint holds no save ({held})")
    spec.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="verify-", dir=spec.work_dir))
    local = VmSpec(
        name=spec.vm_name or VERIFY_VM_NAME,
        kernel=spec.kernel,
        initrd=spec.initrd,
        cmdline=spec.cmdline,
        serial_log=work / "console.log",  # fresh, and this verification's alone
        memory_mb=spec.memory_mb,
        vcpus=spec.vcpus,
        tap=spec.tap,
        disks=tuple(
            disk if disk.read_only else Disk(work / f"disk-{n}.raw")
            for n, disk in enumerate(spec.disks)
        ),
    )
    restored: str | None = None
    known: dict[str, VmState] = {}
    try:
        known = _list(runtime)
        if spec.vm_name is not None and known.get(spec.vm_name) in ACTIVE_STATES:
            raise VerifyError(f"a domain named {spec.vm_name} is already running here")
        save_file = work / "checkpoint.save"
        try:
            rebuild_save_file(store, manifest, save_file, work / "parts")
        except ReplicaError as exc:
            raise _Rejected(f"the checkpoint does not rebuild: {exc}") from None
        except BlockStoreError as exc:
            raise VerifyError(f"rebuilding the checkpoint's save file: {exc}") from exc
        shutil.rmtree(work / "parts", ignore_errors=True)
        try:
            restore_disks(store, manifest, local.disks, spec.disks)
        except CheckpointDiskError as exc:
            raise _Rejected(f"the checkpoint's disks: {exc}") from None
        except ReplicaError as exc:
            raise VerifyError(f"preparing the checkpoint's disks: {exc}") from exc
        except BlockStoreError as exc:
            raise VerifyError(f"rebuilding the checkpoint's disks: {exc}") from exc
        try:
            restored = runtime.restore(save_file, local=local)
        except VmError as exc:
            raise _Rejected(f"the checkpoint does not restore: {exc}") from None
        finally:
            save_file.unlink(missing_ok=True)
        if spec.vm_name is not None and restored != spec.vm_name:
            raise _Rejected(f"the checkpoint is domain {restored!r}, not the job's {spec.vm_name}")
        return _Watch(runtime, restored, local.serial_log, chain, spec.cmdline).wait(timeout_s)
    finally:
        if restored is not None:
            _remove(runtime, restored, keep_definition=restored in known)
        shutil.rmtree(work, ignore_errors=True)


def _list(runtime: VmRuntime) -> dict[str, VmState]:
    try:
        return runtime.list_vms()
    except VmError as exc:
        raise VerifyError(f"listing domains: {exc}") from exc


def _remove(runtime: VmRuntime, name: str, keep_definition: bool) -> None:
    """Destroy the verification domain; undefine it unless this host had defined it before."""
    try:
        state = runtime.list_vms().get(name)
        if state in ACTIVE_STATES:
            runtime.destroy(name)
        if not keep_definition and name in runtime.list_vms():
            runtime.undefine(name)
    except VmError:
        pass  # gone already (a transient domain ends with its guest); nothing left to remove


class _Watch:
    """The restored guest, watched until it shows progress past the checkpoint (or fails to)."""

    def __init__(
        self, runtime: VmRuntime, name: str, serial_log: Path, chain: _Chain, cmdline: str
    ) -> None:
        self.runtime, self.name, self.serial_log, self.chain = runtime, name, serial_log, chain
        self.cmdline = cmdline
        self.tail = chain.text[-TAIL_CHARS:]  # the restored guest's output continues it

    def wait(self, timeout_s: float) -> tuple[int, str]:
        deadline = time.monotonic() + timeout_s
        if self._state() is VmState.PAUSED:
            try:
                self.runtime.resume(self.name)
            except VmError as exc:
                raise _Rejected(f"the restored guest does not resume: {exc}") from None
        cpu_start = self._cpu_s()
        while True:
            seen = self._judge()
            if seen is not None:
                return seen
            state = self._state()
            if state not in (VmState.RUNNING, VmState.PAUSED):
                seen = self._judge()  # what it printed before it stopped
                if seen is not None:
                    return seen
                what = state.value if state is not None else "gone"
                raise _Rejected(
                    f"the restored guest stopped ({what}) before any progress past "
                    f"step {self.chain.last_step}"
                )
            if self.chain.claimed.step == 0 and state is VmState.RUNNING:
                grown = self._cpu_s() - cpu_start
                if grown >= CPU_GROWTH_S:
                    return 0, f"restored; running, vCPU time grew {grown:.2f} s"
            if time.monotonic() >= deadline:
                raise _Rejected(
                    f"no progress past step {self.chain.last_step} within {timeout_s:g} s "
                    "of the restore"
                )
            time.sleep(POLL_S)

    def _judge(self) -> tuple[int, str] | None:
        """The first progress or result the guest printed past the checkpoint, checked."""
        try:
            new = console_text(self.serial_log.read_bytes())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise VerifyError(f"reading the restored guest's console: {exc}") from exc
        text, boundary = self.tail + new, len(self.tail)
        step, state = self.chain.last_step, self.chain.last_state
        start = _start(text, boundary)
        if start is not None:
            if step or self.chain.has_start:
                raise _Rejected("the restored guest started over (a new gleaner-start)")
            _check_job_start(start, self.cmdline)
            state = start[1]  # saved while booting: the seed appears now
        progress = _ends_past(PROGRESS, text, boundary)
        result = _ends_past(RESULT, text, boundary)
        if progress is not None and (result is None or progress.start() < result.start()):
            new_step, new_state = int(progress.group(1)), progress.group(2)
            if new_step != step + 1:
                raise _Rejected(f"the restored guest printed step {new_step}, not {step + 1}")
            if state is not None and new_state != next_state(state):
                raise _Rejected(
                    f"the restored guest's step {new_step} state {new_state} does not follow "
                    f"step {step} state {state}"
                )
            return new_step, f"restored; the guest went on to step {new_step}"
        if result is not None:
            if state is None or step == 0 or result.group(1) != state:
                raise _Rejected(
                    f"the restored guest printed gleaner-result {result.group(1)} at step {step}"
                )
            return step, f"restored; the guest finished at step {step} with the right result"
        return None

    def _state(self) -> VmState | None:
        return _list(self.runtime).get(self.name)

    def _cpu_s(self) -> float:
        try:
            return self.runtime.cpu_time_s(self.name)
        except VmError:
            return 0.0  # it ended between two calls; the next poll sees it gone


def _ends_past(pattern: re.Pattern[str], text: str, boundary: int) -> re.Match[str] | None:
    """The first match whose content ends past `boundary`: a line the restore completed
    counts, one it only gave its line end does not (the replica counted that line, whole
    before its end, as the last of its own console)."""
    for match in pattern.finditer(text):
        if match.end(match.lastindex or 0) > boundary:
            return match
    return None
