"""Progress digests, replica consoles and checkpoint verification.

The unit tests build consoles the way the demo guest prints them, store them
as checkpoints (a ``BlockStore`` in tmp_path) and verify them; where a VM is
needed, ``ConsoleFake`` (a ``FakeVmRuntime`` whose guest writes a scripted
console and whose vCPU clock moves on every look) stands in. A real segment
under a private libvirtd is verified in tests/testbed/test_verify_vm.py.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from kit.consoles import boot_console, chain_lines
from kit.import_graph import imported_roots

from node.base.identity import Identity
from segments.image import workload
from segments.store.blocks import BlockStore
from segments.store.manifest import Manifest
from segments.vm import progress
from segments.vm.fake import FakeVmRuntime
from segments.vm.progress import Progress, decode_progress, encode_progress
from segments.vm.replica import (
    CONSOLE_FILE,
    MEMORY_FILE,
    Replica,
    ReplicaError,
    SegmentRun,
)
from segments.vm.runtime import Disk, VmSpec, VmState
from segments.vm.verify import VerifyError, VerifySpec, verify_checkpoint

IDENTITY = Identity.from_seeds(b"\x05" * 32, b"\x06" * 32)
SEED = "glv"
VM = "gl-verify-test"


# -- consoles as the demo guest prints them ---------------------------------------------


def state(seed: str, step: int) -> str:
    return workload.reference_result(seed, step)


def claim_of(text: str) -> bytes:
    return encode_progress(text)


# -- encode_progress / decode_progress --------------------------------------------------


def test_encode_progress_layout() -> None:
    text = boot_console(SEED, 5)
    digest = encode_progress(text)
    assert len(digest) == 32
    assert digest[:8] == (5).to_bytes(8, "big")
    assert digest[8:16] == bytes.fromhex(state(SEED, 5))
    assert digest[16:] == hashlib.blake2b(text.encode()).digest()[:16]
    # the first 16 bytes of BLAKE2b-512, not BLAKE2b with a 16-byte output
    assert digest[16:] != hashlib.blake2b(text.encode(), digest_size=16).digest()


def test_encode_progress_without_progress_lines() -> None:
    text = "Linux version 6.1\r\nsome other guest\r\n"
    digest = encode_progress(text)
    assert digest[:16] == bytes(16)
    assert digest[16:] == hashlib.blake2b(text.encode()).digest()[:16]
    assert decode_progress(digest) == Progress(0, None, digest[16:])


def test_encode_progress_takes_the_last_line_and_hashes_every_byte() -> None:
    text = boot_console(SEED, 3) + "gleaner-progress 2 " + state(SEED, 2) + "\r\n"
    assert decode_progress(encode_progress(text)).step == 2  # the last line, not the highest
    assert encode_progress(text)[16:] != encode_progress(text + " ")[16:]
    assert encode_progress("\u00e9")[16:] == hashlib.blake2b("\u00e9".encode()).digest()[:16]


def test_decode_progress_round_trip() -> None:
    text = boot_console(SEED, 7)
    decoded = decode_progress(encode_progress(text))
    assert decoded.step == 7
    assert decoded.state == state(SEED, 7)
    assert decoded.console_digest == hashlib.blake2b(text.encode()).digest()[:16]


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_decode_progress_wrong_length(length: int) -> None:
    with pytest.raises(ValueError, match=rf"32 bytes, got {length}"):
        decode_progress(bytes(length))


def test_decode_progress_refuses_a_state_without_a_step_and_non_bytes() -> None:
    with pytest.raises(ValueError, match="state but no step"):
        decode_progress(bytes(8) + b"\x01" * 8 + bytes(16))
    with pytest.raises(ValueError, match="bytes, not str"):
        decode_progress("x" * 32)  # type: ignore[arg-type]


def test_encode_progress_refuses_a_step_beyond_64_bits() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        encode_progress(f"gleaner-progress {2**64} {'0' * 16}\n")


def test_progress_module_is_pure() -> None:
    imported = imported_roots(Path(progress.__file__))
    assert not imported & {"os", "time", "socket", "trio", "libvirt", "random", "subprocess"}


# -- a fake guest with a console ----------------------------------------------------------


class ConsoleFake(FakeVmRuntime):
    """A fake whose guest prints `boot_output` at start and `restore_output` at restore.

    Every vCPU-time reading first moves the clock of running domains by `tick`
    seconds, so a replica's extent passes without a test driving the clock.
    With `power_off_at_restore`, a restored guest ends at once.
    """

    def __init__(self, tick: float = 0.5) -> None:
        super().__init__()
        self.tick = tick
        self.boot_output = ""
        self.restore_output = ""
        self.power_off_at_restore = False
        self.restored_specs: list[VmSpec] = []

    def start(self, name: str) -> None:
        super().start(name)
        self._print(self.domains[name].spec.serial_log, self.boot_output)

    def restore(self, path: Path, paused: bool = False, local: VmSpec | None = None) -> str:
        name = super().restore(path, paused, local)
        log = self.domains[name].spec.serial_log
        if local is not None:  # (the fake keeps an existing definition's log: take the new one)
            self.restored_specs.append(local)
            log = local.serial_log
        self._print(log, self.restore_output)
        if self.power_off_at_restore:
            self.guest_powered_off(name)
        return name

    def cpu_time_s(self, name: str) -> float:
        self.advance(self.tick, name)
        return super().cpu_time_s(name)

    @staticmethod
    def _print(path: Path, text: str) -> None:
        with open(path, "a", encoding="utf-8") as log:
            log.write(text)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BlockStore]:
    made = BlockStore(tmp_path / "blocks")
    try:
        yield made
    finally:
        made.close()


def segment_run(tmp_path: Path, extent: float = 1.0, name: str = VM) -> SegmentRun:
    return SegmentRun(
        vm_name=name,
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd.img",
        cmdline=workload.kernel_cmdline(steps=0, seed=SEED),
        memory_mb=96,
        vcpus=1,
        extent_cpu_s=extent,
    )


def verify_spec(tmp_path: Path, **changes: object) -> VerifySpec:
    fields: dict[str, object] = {
        "kernel": tmp_path / "vmlinuz",
        "initrd": tmp_path / "initrd.img",
        "cmdline": workload.kernel_cmdline(steps=0, seed=SEED),
        "memory_mb": 96,
        "vcpus": 1,
        "work_dir": tmp_path / "verify",
        "vm_name": VM,
    }
    fields.update(changes)
    return VerifySpec(**fields)  # type: ignore[arg-type]


def checkpoint_of(tmp_path: Path, store: BlockStore, console: str, save: bool = False) -> Manifest:
    """A stored checkpoint holding `console` (and, with `save`, a fake VM's save file)."""
    files: dict[str, Path] = {}
    if save:
        fake = FakeVmRuntime()
        spec = VmSpec(VM, tmp_path / "k", tmp_path / "i", "", tmp_path / "old-serial.log")
        fake.define(spec)
        fake.start(VM)
        fake.save(VM, tmp_path / "saved.json")
        files[MEMORY_FILE] = tmp_path / "saved.json"
    console_path = tmp_path / f"console-{secrets.token_hex(4)}"
    console_path.write_bytes(console.encode())
    files[CONSOLE_FILE] = console_path
    return store.put_files(files, IDENTITY)


def verify(
    tmp_path: Path,
    store: BlockStore,
    manifest: Manifest,
    claimed: bytes,
    base: bytes | None = None,
    halted: bool = False,
    runtime: FakeVmRuntime | None = None,
    timeout_s: float = 5.0,
    **spec: object,
):
    return verify_checkpoint(
        runtime if runtime is not None else ConsoleFake(),
        store,
        verify_spec(tmp_path, **spec),
        manifest,
        claimed,
        base,
        halted,
        timeout_s,
    )


# -- the replica's console ------------------------------------------------------------------


def test_replica_checkpoint_carries_its_console_and_progress(
    tmp_path: Path, store: BlockStore
) -> None:
    runtime = ConsoleFake()
    runtime.boot_output = boot_console(SEED, 4)
    work = tmp_path / "replica"
    work.mkdir()
    (work / "serial.log").write_text("an older run's console\n")  # never carried over
    result = Replica(runtime, store, IDENTITY, work).run(segment_run(tmp_path), None)
    assert not result.powered_off
    assert sorted(f.name for f in result.checkpoint.files) == [CONSOLE_FILE, MEMORY_FILE]
    console = store.read_file(result.checkpoint, CONSOLE_FILE).decode()
    assert console == boot_console(SEED, 4)
    assert result.progress == encode_progress(console)
    assert decode_progress(result.progress).step == 4
    assert runtime.list_vms() == {}


def test_replica_restore_ignores_the_console(tmp_path: Path, store: BlockStore) -> None:
    runtime = ConsoleFake()
    runtime.boot_output = boot_console(SEED, 4)
    first = Replica(runtime, store, IDENTITY, tmp_path / "r0").run(segment_run(tmp_path), None)
    runtime.restore_output = chain_lines(SEED, 5, 9)
    second = Replica(runtime, store, IDENTITY, tmp_path / "r1").run(
        segment_run(tmp_path), first.checkpoint
    )
    # the fake's restore reads the materialised save file as JSON: a console in it would break it
    assert runtime.restored_specs[-1].serial_log == tmp_path / "r1" / "serial.log"
    assert store.read_file(second.checkpoint, CONSOLE_FILE).decode() == chain_lines(SEED, 5, 9)
    assert decode_progress(second.progress).step == 9
    assert not list((tmp_path / "r1").glob("restore*"))


def test_replica_of_a_guest_that_powers_off_keeps_only_its_console(
    tmp_path: Path, store: BlockStore
) -> None:
    runtime = ConsoleFake()
    runtime.boot_output = boot_console(SEED, 3, steps=3) + f"gleaner-result {state(SEED, 3)}\r\n"
    replica = Replica(runtime, store, IDENTITY, tmp_path / "r0")
    run = segment_run(tmp_path)
    original_start = runtime.start

    def start_and_finish(name: str) -> None:
        original_start(name)
        runtime.guest_powered_off(name)

    runtime.start = start_and_finish  # type: ignore[method-assign]
    result = replica.run(run, None)
    assert result.powered_off
    assert [f.name for f in result.checkpoint.files] == [CONSOLE_FILE]
    assert decode_progress(result.progress).step == 3
    with pytest.raises(ReplicaError, match="holds no save file"):
        Replica(runtime, store, IDENTITY, tmp_path / "r1").run(run, result.checkpoint)


def test_replica_cancel_still_cleans_up(tmp_path: Path, store: BlockStore) -> None:
    runtime = ConsoleFake(tick=0.0)
    replica = Replica(runtime, store, IDENTITY, tmp_path / "r0")
    replica.cancel()
    with pytest.raises(ReplicaError, match="cancelled"):
        replica.run(segment_run(tmp_path), None)
    assert runtime.list_vms() == {}


# -- (a) the claim is the console's -------------------------------------------------------


def test_claim_must_match_the_console(tmp_path: Path, store: BlockStore) -> None:
    text = boot_console(SEED, 5)
    manifest = checkpoint_of(tmp_path, store, text, save=True)
    claim = claim_of(text)
    runtime = ConsoleFake()
    more_steps = claim_of(boot_console(SEED, 6))
    verdict = verify(tmp_path, store, manifest, more_steps, runtime=runtime)
    assert not verdict.ok
    assert "claimed step 6" in verdict.reason and "console shows step 5" in verdict.reason
    other_digest = claim[:16] + bytes(16)
    verdict = verify(tmp_path, store, manifest, other_digest, runtime=runtime)
    assert not verdict.ok and "console digest" in verdict.reason
    verdict = verify(tmp_path, store, manifest, claim[:31], runtime=runtime)
    assert not verdict.ok and "claimed progress: a progress digest is 32 bytes" in verdict.reason
    assert runtime.calls == []  # rejected before anything was restored


def test_a_checkpoint_without_console_is_rejected(tmp_path: Path, store: BlockStore) -> None:
    saved = tmp_path / "memory"
    saved.write_bytes(b"x" * 100)
    manifest = store.put_files({MEMORY_FILE: saved}, IDENTITY)
    verdict = verify(tmp_path, store, manifest, claim_of(""))
    assert not verdict.ok and verdict.reason == "the checkpoint has no console file"


def test_a_console_not_in_the_store_is_this_hosts_problem(tmp_path: Path) -> None:
    holder = BlockStore(tmp_path / "holder")
    empty = BlockStore(tmp_path / "empty")
    try:
        manifest = checkpoint_of(tmp_path, holder, boot_console(SEED, 2))
        with pytest.raises(VerifyError, match="reading the console"):
            verify(tmp_path, empty, manifest, claim_of(boot_console(SEED, 2)))
    finally:
        holder.close()
        empty.close()


# -- (b) the console continues from base ----------------------------------------------------


SIX_STEPS = workload.kernel_cmdline(steps=6, seed=SEED)


def halted_console(text: str, last: int, seed: str = SEED) -> str:
    return text + f"gleaner-result {state(seed, last)}\r\n"


@pytest.mark.parametrize(
    ("console", "base_step", "reason"),
    [
        (chain_lines(SEED, 1, 4), None, "segment 0 printed progress but no gleaner-start"),
        (boot_console("other", 4), None, "the guest ran seed 'other', the job's is 'glv'"),
        (boot_console(SEED, 4, steps=9), None, "the guest ran 9 steps, the job's are 0"),
        (chain_lines(SEED, 5, 8), 3, "the run starts at step 5, expected 4"),
        (chain_lines(SEED, 1, 8), 3, "the run starts at step 1, expected 4"),
        (chain_lines(SEED, 4, 5) + chain_lines(SEED, 7, 8), 3, "gap: step 7 follows step 5"),
        (chain_lines(SEED, 4, 6) + chain_lines(SEED, 6, 6), 3, "reset: step 6 follows step 6"),
        (chain_lines("x", 4, 6), 3, "does not follow step 3 state"),
        (boot_console(SEED, 4), 3, "the guest started over"),
        ("a quiet console\r\n", 3, "no gleaner-progress line after base step 3"),
        ("4 0123456789abcdef\r\n" + chain_lines(SEED, 5, 6), 3, "starts at step 5"),
    ],
)
def test_console_must_continue_the_chain_from_base(
    tmp_path: Path, store: BlockStore, console: str, base_step: int | None, reason: str
) -> None:
    manifest = checkpoint_of(tmp_path, store, console, save=True)
    base = claim_of(boot_console(SEED, base_step)) if base_step is not None else None
    runtime = ConsoleFake()
    verdict = verify(tmp_path, store, manifest, claim_of(console), base, runtime=runtime)
    assert not verdict.ok
    assert reason in verdict.reason
    assert runtime.calls == []


@pytest.mark.parametrize(
    ("console", "base_step", "last"),
    [
        (halted_console(boot_console(SEED, 6, steps=6), 6), None, 6),  # one segment, whole job
        (halted_console(chain_lines(SEED, 4, 6), 6), 3, 6),
        # the previous save cut line 4: its tail comes first, and fits exactly
        (halted_console(f"{state(SEED, 4)[5:]}\r\n" + chain_lines(SEED, 5, 6), 6), 3, 6),
        (halted_console(f"ress 4 {state(SEED, 4)}\r\n" + chain_lines(SEED, 5, 6), 6), 3, 6),
        (halted_console("\r\n" + chain_lines(SEED, 4, 6), 6), 3, 6),  # only a line break left
        # the previous segment ended after its last step, before the result line ...
        (halted_console("", 3), 3, 3),
        # ... or in the middle of it
        (f"sult {state(SEED, 3)}\r\n", 3, 3),
        # it cut line 4, the last: its tail, then the result
        (halted_console(f"{state(SEED, 4)[9:]}\r\n", 4), 3, 4),
    ],
)
def test_consoles_that_continue_from_base_and_finish(
    tmp_path: Path, store: BlockStore, console: str, base_step: int | None, last: int
) -> None:
    manifest = checkpoint_of(tmp_path, store, console)
    base = claim_of(boot_console(SEED, base_step)) if base_step is not None else None
    verdict = verify(
        tmp_path, store, manifest, claim_of(console), base, halted=True, cmdline=SIX_STEPS
    )
    assert verdict.ok, verdict.reason
    assert verdict.new_step == last


def test_a_guest_without_progress_lines_passes_only_from_a_base_without(
    tmp_path: Path, store: BlockStore
) -> None:
    console = "Linux version 6.1\r\nsome other guest\r\n"
    manifest = checkpoint_of(tmp_path, store, console)
    claim = claim_of(console)
    for base in (None, claim_of("an earlier console\r\n")):
        verdict = verify(tmp_path, store, manifest, claim, base, halted=True)
        assert verdict.ok, verdict.reason
        assert verdict.new_step == 0
    verdict = verify(tmp_path, store, manifest, claim, claim_of(boot_console(SEED, 3)))
    assert not verdict.ok and "no gleaner-progress line after base step 3" in verdict.reason


def test_a_malformed_base_is_the_callers_error(tmp_path: Path, store: BlockStore) -> None:
    manifest = checkpoint_of(tmp_path, store, "")
    with pytest.raises(ValueError, match="32 bytes"):
        verify(tmp_path, store, manifest, claim_of(""), b"short", halted=True)


# -- (d) a halted guest finished the chain -------------------------------------------------------


@pytest.mark.parametrize(
    ("console", "reason"),
    [
        (boot_console(SEED, 6, steps=6), "powered off without a gleaner-result line (step 6)"),
        (halted_console(boot_console(SEED, 6, steps=6), 5), "is not the chain's state"),
        # a start line but no step: the chain's state is the seed
        (f"gleaner-start 6 {SEED}\r\ngleaner-result {'0' * 16}\r\n", "at step 0"),
    ],
)
def test_halted_consoles_must_end_with_the_chains_result(
    tmp_path: Path, store: BlockStore, console: str, reason: str
) -> None:
    manifest = checkpoint_of(tmp_path, store, console)
    verdict = verify(
        tmp_path, store, manifest, claim_of(console), None, halted=True, cmdline=SIX_STEPS
    )
    assert not verdict.ok
    assert reason in verdict.reason


def test_a_halted_claim_with_a_save_file_is_rejected(tmp_path: Path, store: BlockStore) -> None:
    console = halted_console(boot_console(SEED, 6, steps=6), 6)
    manifest = checkpoint_of(tmp_path, store, console, save=True)
    verdict = verify(
        tmp_path, store, manifest, claim_of(console), None, halted=True, cmdline=SIX_STEPS
    )
    assert not verdict.ok and "holds a save" in verdict.reason


# -- (c) the checkpoint is alive (a fake guest) ---------------------------------------------


def leftovers(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "verify").iterdir())


def test_restored_guest_must_print_the_next_step(tmp_path: Path, store: BlockStore) -> None:
    console = chain_lines(SEED, 4, 9)
    manifest = checkpoint_of(tmp_path, store, console, save=True)
    base = claim_of(boot_console(SEED, 3))
    runtime = ConsoleFake()
    runtime.restore_output = chain_lines(SEED, 10, 12)
    verdict = verify(tmp_path, store, manifest, claim_of(console), base, runtime=runtime)
    assert verdict.ok, verdict.reason
    assert (verdict.claimed_step, verdict.new_step) == (9, 10)
    restored = runtime.restored_specs[-1]
    assert restored.serial_log.parent.parent == tmp_path / "verify"  # a fresh log of its own
    assert runtime.list_vms() == {}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        (chain_lines(SEED, 11, 12), "printed step 11, not 10"),
        (chain_lines(SEED, 1, 3), "printed step 1, not 10"),
        (f"gleaner-progress 10 {'0' * 16}\r\n", "step 10 state 0000000000000000 does not follow"),
        (f"gleaner-start 0 {SEED}\r\n" + chain_lines(SEED, 1, 2), "started over"),
        (f"gleaner-result {state(SEED, 8)}\r\n", "printed gleaner-result"),
        ("", "no progress past step 9 within 0.3 s"),
    ],
)
def test_restored_guest_that_does_not_continue_is_rejected(
    tmp_path: Path, store: BlockStore, output: str, reason: str
) -> None:
    console = chain_lines(SEED, 4, 9)
    manifest = checkpoint_of(tmp_path, store, console, save=True)
    runtime = ConsoleFake()
    runtime.restore_output = output
    base = claim_of(boot_console(SEED, 3))
    verdict = verify(
        tmp_path, store, manifest, claim_of(console), base, runtime=runtime, timeout_s=0.3
    )
    assert not verdict.ok
    assert reason in verdict.reason
    assert runtime.list_vms() == {}
    assert leftovers(tmp_path) == []


def test_a_line_cut_by_the_save_is_read_whole(tmp_path: Path, store: BlockStore) -> None:
    line_10 = f"gleaner-progress 10 {state(SEED, 10)}\r\n"
    console = chain_lines(SEED, 4, 9) + line_10[:25]
    manifest = checkpoint_of(tmp_path, store, console, save=True)
    runtime = ConsoleFake()
    runtime.restore_output = line_10[25:] + chain_lines(SEED, 11, 11)
    verdict = verify(
        tmp_path, store, manifest, claim_of(console), claim_of(boot_console(SEED, 3)),
        runtime=runtime,
    )  # fmt: skip
    assert verdict.ok, verdict.reason
    assert (verdict.claimed_step, verdict.new_step) == (9, 10)


def test_a_save_between_a_line_and_its_line_end_claims_that_line(
    tmp_path: Path, store: BlockStore
) -> None:
    # The save came after line 10's state, before its line end: the replica counts
    # line 10 (it is whole), and the restored guest's first output is that line end.
    line_10 = f"gleaner-progress 10 {state(SEED, 10)}"
    console = chain_lines(SEED, 4, 9) + line_10
    manifest = checkpoint_of(tmp_path, store, console, save=True)
    runtime = ConsoleFake()
    runtime.restore_output = "\r\n" + chain_lines(SEED, 11, 11)
    verdict = verify(
        tmp_path, store, manifest, claim_of(console), claim_of(boot_console(SEED, 3)),
        runtime=runtime,
    )  # fmt: skip
    assert verdict.ok, verdict.reason
    assert (verdict.claimed_step, verdict.new_step) == (10, 11)


def test_restored_guest_may_finish_with_the_right_result(tmp_path: Path, store: BlockStore) -> None:
    console = chain_lines(SEED, 4, 9)
    manifest = checkpoint_of(tmp_path, store, console, save=True)
    runtime = ConsoleFake()
    runtime.restore_output = f"gleaner-result {state(SEED, 9)}\r\n"
    runtime.power_off_at_restore = True
    verdict = verify(
        tmp_path, store, manifest, claim_of(console), claim_of(boot_console(SEED, 3)),
        runtime=runtime,
    )  # fmt: skip
    assert verdict.ok, verdict.reason
    assert verdict.new_step == 9


def test_restored_guest_that_stops_at_once_is_rejected(tmp_path: Path, store: BlockStore) -> None:
    console = chain_lines(SEED, 4, 9)
    manifest = checkpoint_of(tmp_path, store, console, save=True)
    runtime = ConsoleFake()
    runtime.power_off_at_restore = True
    verdict = verify(
        tmp_path, store, manifest, claim_of(console), claim_of(boot_console(SEED, 3)),
        runtime=runtime,
    )  # fmt: skip
    assert not verdict.ok and "stopped (gone) before any progress past step 9" in verdict.reason


def test_guest_without_progress_lines_must_run(tmp_path: Path, store: BlockStore) -> None:
    console = "Linux version 6.1\r\nsome other guest\r\n"
    manifest = checkpoint_of(tmp_path, store, console, save=True)
    verdict = verify(tmp_path, store, manifest, claim_of(console), None, runtime=ConsoleFake())
    assert verdict.ok, verdict.reason
    assert verdict.new_step == 0
    frozen = ConsoleFake(tick=0.0)  # its vCPU clock never moves
    verdict = verify(
        tmp_path, store, manifest, claim_of(console), None, runtime=frozen, timeout_s=0.3
    )
    assert not verdict.ok and "within 0.3 s" in verdict.reason


def test_restore_failures(tmp_path: Path, store: BlockStore) -> None:
    console = chain_lines(SEED, 4, 9)
    claim, base = claim_of(console), claim_of(boot_console(SEED, 3))
    runtime = ConsoleFake()
    runtime.fail_next("restore", "bad image")
    with_save = checkpoint_of(tmp_path, store, console, save=True)
    verdict = verify(tmp_path, store, with_save, claim, base, runtime=runtime)
    assert not verdict.ok and "does not restore" in verdict.reason
    without_save = checkpoint_of(tmp_path, store, console)
    verdict = verify(tmp_path, store, without_save, claim, base, runtime=runtime)
    assert not verdict.ok and "holds no save" in verdict.reason
    verdict = verify(tmp_path, store, with_save, claim, base, runtime=runtime, vm_name="gl-other")
    assert not verdict.ok and "not the job's gl-other" in verdict.reason
    assert runtime.list_vms() == {}
    assert leftovers(tmp_path) == []


def test_local_conflicts_raise_and_definitions_stay(tmp_path: Path, store: BlockStore) -> None:
    console = chain_lines(SEED, 4, 9)
    claim, base = claim_of(console), claim_of(boot_console(SEED, 3))
    manifest = checkpoint_of(tmp_path, store, console, save=True)
    runtime = ConsoleFake()
    runtime.restore_output = chain_lines(SEED, 10, 10)
    runtime.define(VmSpec(VM, tmp_path / "k", tmp_path / "i", "", tmp_path / "mine.log"))
    verdict = verify(tmp_path, store, manifest, claim, base, runtime=runtime)
    assert verdict.ok, verdict.reason
    assert runtime.list_vms() == {VM: VmState.SHUTOFF}  # this host's definition is left alone
    runtime.start(VM)
    with pytest.raises(VerifyError, match=f"a domain named {VM} is already running here"):
        verify(tmp_path, store, manifest, claim, base, runtime=runtime)
    assert runtime.list_vms() == {VM: VmState.RUNNING}
    assert leftovers(tmp_path) == []


def test_a_checkpoint_s_disks_are_restored_into_copies_of_their_own(
    tmp_path: Path, store: BlockStore
) -> None:
    console = chain_lines(SEED, 4, 9)
    manifest = checkpoint_of(tmp_path, store, console, save=True)
    image = tmp_path / "image.raw"
    image.write_bytes(b"read-only")
    disks = (Disk(tmp_path / "scratch.raw"), Disk(image, read_only=True))
    base = claim_of(boot_console(SEED, 3))
    verdict = verify(tmp_path, store, manifest, claim_of(console), base, disks=disks)
    assert not verdict.ok and "the checkpoint's disks" in verdict.reason  # it holds none
    scratch = tmp_path / "scratch-src.raw"
    scratch.write_bytes(b"guest files" * 1000)
    with pytest.raises(VerifyError, match="preparing the checkpoint's disks"):
        verify(
            tmp_path,
            store,
            store.put_files({"disk-0": scratch, **_parts(store, manifest, tmp_path)}, IDENTITY),
            claim_of(console),
            base,
            disks=disks,
        )
    (tmp_path / "scratch.raw").write_bytes(bytes(len(scratch.read_bytes())))  # as prepared
    with_disk = store.put_files({**_parts(store, manifest, tmp_path), "disk-0": scratch}, IDENTITY)
    runtime = ConsoleFake()
    runtime.restore_output = chain_lines(SEED, 10, 12)
    verdict = verify(
        tmp_path, store, with_disk, claim_of(console), base, runtime=runtime, disks=disks
    )
    assert verdict.ok, verdict.reason
    restored = runtime.restored_specs[-1].disks
    assert restored[1] == disks[1] and restored[0].path.parent.parent == tmp_path / "verify"
    assert (tmp_path / "scratch.raw").read_bytes() == bytes(11000)  # the job's own file stays
    assert leftovers(tmp_path) == []


def _parts(store: BlockStore, manifest: Manifest, tmp_path: Path) -> dict[str, Path]:
    files = {f.name: tmp_path / f"part-{f.name}" for f in manifest.files}
    for entry in manifest.files:
        store.materialize(replace(manifest, files=(entry,)), files[entry.name])
    return files
