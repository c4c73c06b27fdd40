"""The measurements bench/run.py makes. Each returns raw samples (lists of seconds or ms); the
caller summarises them. Nothing here asserts: figures are printed beside their targets."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import ROOT  # noqa: E402  (also puts the repo on sys.path)

from harness.el2.snapshot import El2Reader  # noqa: E402
from harness.el2.trace import Tracer  # noqa: E402
from harness.image.initramfs import READY_MARKER  # noqa: E402
from harness.image.payloads import GUEST_DIR  # noqa: E402
from harness.kernel.build import KernelArtifacts, build  # noqa: E402
from harness.kernel.version import MODEL_REFERENCE, KernelVersion  # noqa: E402
from harness.machine import Machine, MachineRequest, assemble, build_request  # noqa: E402
from harness.options import BootOptions, KernelOptions  # noqa: E402
from harness.paths import default_cache_dir  # noqa: E402
from harness.replay import LiveReplay, replay_trace  # noqa: E402
from harness.verdict import PKVM_UP_RE  # noqa: E402

HARNESS = [sys.executable, "-m", "harness"]
LIFECYCLE = f"{GUEST_DIR}/pkvm_guest --vms 2 --vcpus 3 --pages 16"


def _timed(argv: list[str], *, timeout: float, env: dict | None = None, cwd: Path = ROOT) -> float:
    t = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}... exited {r.returncode}: {(r.stdout + r.stderr)[-1500:]}")
    return time.monotonic() - t


def _until_line(argv: list[str], pattern: re.Pattern[str], *, timeout: float, env: dict | None = None,
                cwd: Path = ROOT) -> float:
    """Seconds from starting `argv` until one line of its output matches; then it is stopped."""
    t = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    assert proc.stdout is not None
    buf, seen = b"", []
    try:
        while time.monotonic() - t < timeout:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                seen.append(text)
                if pattern.search(text):
                    return time.monotonic() - t
        raise RuntimeError(f"{' '.join(argv[:3])}...: no line matching {pattern.pattern!r} within "
                           f"{timeout:.0f}s; last lines: {seen[-5:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


# --- set-up and builds ------------------------------------------------------------------------

def setup_python_env(runs: int) -> list[float]:
    """`ci/setup.sh --python-only` into a new virtual environment, without pip's cache (the part of
    a new machine's set-up that can be repeated here; apt's part is installed already)."""
    out = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="pkvm-bench-venv-") as tmp:
            out.append(_timed([str(ROOT / "ci" / "setup.sh"), "--python-only", "--venv", f"{tmp}/venv"],
                              timeout=1800, env={"PIP_NO_CACHE_DIR": "1"}))
    return out


def recorded_cold_builds(cache: Path) -> list[float]:
    """Cold builds (an empty O= directory) recorded in the kernel cache's meta.json files."""
    out = []
    for meta in (cache / "kernels").glob("*/meta.json"):
        m = json.loads(meta.read_text())
        if m.get("cold") and m.get("build_seconds"):
            out.append(float(m["build_seconds"]))
    return out


def cold_build_now(cache: Path, runs: int) -> list[float]:
    """A cold build into a scratch cache (the unpacked source is copied: unpacking is not building)."""
    out = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="pkvm-bench-cache-") as scratch:
            shutil.copytree(cache / "src", Path(scratch) / "src", symlinks=True)
            t = time.monotonic()
            build(build_request(KernelOptions(), Path(scratch), quiet=True))
            out.append(time.monotonic() - t)
    return out


def warm_build_no_change(runs: int) -> list[float]:
    """`pkvm-harness build` with the kernel cached: the real CLI, nothing to do."""
    return [_timed([*HARNESS, "build", "-q"], timeout=600) for _ in range(runs)]


def build_after_touching_page_alloc(runs: int, scratch: Path) -> list[float]:
    """`pkvm-harness build --patch` with a one-line change to nvhe/page_alloc.c, new each run (so
    each is a new kernel, built incrementally in the shared re-patched tree)."""
    out = []
    stamp = time.strftime("%Y%m%d%H%M%S")
    for i in range(runs):
        patch = scratch / f"touch-page-alloc-{i}.patch"
        patch.write_text(
            "--- a/arch/arm64/kvm/hyp/nvhe/page_alloc.c\n+++ b/arch/arm64/kvm/hyp/nvhe/page_alloc.c\n"
            "@@ -1,3 +1,4 @@\n // SPDX-License-Identifier: GPL-2.0-only\n"
            f"+/* bench {stamp}-{i} */\n /*\n  * Copyright (C) 2020 Google LLC\n")
        out.append(_timed([*HARNESS, "build", "-q", "--patch", str(patch)], timeout=1800))
    return out


# --- boot ----------------------------------------------------------------------------------------

def _machine(cache: Path, run_dir: Path, *, payloads: bool = False, gdb: bool = False,
             kernel: KernelOptions | None = None, **boot: str) -> Machine:
    """The default machine (or `kernel`'s), assembled as the CLI does (harness.machine)."""
    request = MachineRequest.check(kernel or KernelOptions(), BootOptions(**boot), cache,  # type: ignore[arg-type]
                                   quiet=True)
    return assemble(request, run_dir, payloads=payloads, gdb=gdb)


def harness_and_bare_boots(kernel: KernelArtifacts, cache: Path, runs: int) -> tuple[list[float], list[float]]:
    """Seconds to the ready marker: the harness (QemuTarget: spawn, console, QMP, the shell's
    marker) against the same QEMU command line run bare, its console read until the same marker."""
    harness, bare = [], []
    marker = re.compile(re.escape(READY_MARKER))
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="pkvm-bench-boot-") as tmp:
            machine = _machine(cache, Path(tmp))
            t = time.monotonic()
            with machine.start(Path(tmp)):
                harness.append(time.monotonic() - t)
        with tempfile.TemporaryDirectory(prefix="pkvm-bench-bare-") as tmp:
            bare.append(_until_line(_machine(cache, Path(tmp)).spec.argv(), marker, timeout=120))
    return harness, bare


def pkvm_up_times(kernel: KernelArtifacts, cache: Path, runs: int, qemu: str = "qemu-system-aarch64",
                  el2_plugin: str = "off") -> list[float]:
    """QEMU start to "Protected ... mode initialized", bare QEMU, console read directly."""
    out = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="pkvm-bench-up-") as tmp:
            machine = _machine(cache, Path(tmp), qemu=qemu, el2_plugin=el2_plugin)
            out.append(_until_line(machine.spec.argv(), PKVM_UP_RE, timeout=120))
    return out


LIFECYCLES = f"for i in 1 2 3 4 5; do {LIFECYCLE} >/dev/null || exit 1; done"   # long enough to time


def plugin_workload(runs: int, workload: str = LIFECYCLES) -> tuple[list[float], list[float], list[dict]]:
    """The workload on a machine running el2trace against the same machine without it (QEMU 10),
    alternating runs on two booted machines; per el2trace run, the calls recorded and the live
    replay's time to take them in."""
    cache = default_cache_dir()
    on, off, extra = [], [], []
    with tempfile.TemporaryDirectory(prefix="pkvm-bench-plugin-") as a, \
            tempfile.TemporaryDirectory(prefix="pkvm-bench-noplugin-") as b:
        traced = _machine(cache, Path(a), payloads=True, el2_plugin="on")
        plain = _machine(cache, Path(b), payloads=True, el2_plugin="off")
        assert traced.spec.plugin is not None
        with traced.start(Path(a)) as t_on, plain.start(Path(b)) as t_off:
            live = LiveReplay(traced.spec.plugin[2])
            for target in (t_on, t_off):              # one unmeasured run each: page cache, first VM
                target.run(workload, timeout=600).check()
            live.poll()
            for _ in range(runs):
                t = time.monotonic()
                t_on.run(workload, timeout=600).check()
                on.append(time.monotonic() - t)
                t = time.monotonic()
                t_off.run(workload, timeout=600).check()
                off.append(time.monotonic() - t)
                before = live.ops_total
                t = time.perf_counter()
                live.poll()
                extra.append({"ops": live.ops_total - before, "replay_s": time.perf_counter() - t,
                              "divergence": live.replayer.divergence is not None})
    return on, off, extra


def harness_command() -> list[str]:
    """`pkvm-harness` as a user runs it: the console script beside this Python, else `python -m harness`."""
    script = Path(sys.executable).with_name("pkvm-harness")
    return [str(script)] if script.is_file() else HARNESS


def warm_run_and_bare(runs: int, command: list[str] | None = None, cwd: Path = ROOT) -> tuple[list[float], list[float]]:
    """Pairs, alternating: the whole warm `pkvm-harness run -q` (start to exit: imports, the cache
    lookups, the image, the boot, power-off, the verdict, the run directory) and the very QEMU
    command that run wrote to its qemu-cmd.sh, run bare to the same ready marker. One unmeasured
    run first, so the caches are warm (and to learn the command)."""
    import shlex

    argv = [*(command or harness_command()), "run", "-q"]
    marker = re.compile(re.escape(READY_MARKER))
    with tempfile.TemporaryDirectory(prefix="pkvm-bench-run-") as runs_dir:
        _timed([*argv, "--runs-dir", runs_dir], timeout=900, cwd=cwd)
        (cmd_file,) = [p for p in Path(runs_dir).glob("*/qemu-cmd.sh") if not p.parent.is_symlink()]  # not latest/
        qemu = shlex.split(cmd_file.read_text().strip().splitlines()[-1])
        old_dir = str(cmd_file.parent.resolve())
    whole, bare = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="pkvm-bench-run-") as runs_dir:
            whole.append(_timed([*argv, "--runs-dir", runs_dir], timeout=300, cwd=cwd))
        with tempfile.TemporaryDirectory(prefix="pkvm-bench-bare-") as tmp:     # its QMP socket goes here
            bare.append(_until_line([a.replace(old_dir, tmp) for a in qemu], marker, timeout=120))
    return whole, bare


# --- suites and the first verdict ------------------------------------------------------------------

def suite_wall(runs: int, *args: str) -> list[float]:
    """The default (nightly) suites, `pytest test_suites -m "not slow"` (plus `args`), start to exit."""
    out = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="pkvm-bench-suite-") as tmp:
            out.append(_timed([sys.executable, "-m", "pytest", "test_suites", "-m", "not slow", "-q",
                               "-p", "no:cacheprovider", "--pkvm-run-dir", tmp, *args], timeout=3600))
    return out


def suite_checks(runs: int) -> tuple[list[float], list[float]]:
    """The default suites' wall time, and the part of it the after-test checks took (invariants on
    a fresh snapshot and the page-state transitions after every EL2 suite test: result.json's
    el2trace.after_test_checks)."""
    walls, checks = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="pkvm-bench-oracle-") as tmp:
            walls.append(_timed([sys.executable, "-m", "pytest", "test_suites", "-m", "not slow", "-q",
                                 "-p", "no:cacheprovider", "--pkvm-run-dir", tmp], timeout=3600))
            result = json.loads((Path(tmp) / "result.json").read_text())
            checks.append(float(result["el2trace"]["after_test_checks"]["seconds"]))
    return walls, checks


FIRST_PYTEST_RESULT = re.compile(r"::\S+ (PASSED|FAILED|SKIPPED|ERROR)")


def harness_first_verdict(runs: int) -> list[float]:
    """`pytest test_suites/boot -v` from a warm cache, start to its first test result line."""
    out = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="pkvm-bench-first-") as tmp:
            out.append(_until_line([sys.executable, "-m", "pytest", "test_suites/boot", "-v", "-p",
                                    "no:cacheprovider", "--pkvm-run-dir", tmp], FIRST_PYTEST_RESULT, timeout=600))
    return out


FIRST_KUNIT_RESULT = re.compile(r"\[(PASSED|FAILED|SKIPPED)\]|^\s*(not )?ok \d+ ")


def kunit_first_result(tree: Path, build_dir: Path, runs: int) -> tuple[dict, list[float]]:
    """KUnit's own tool from the same kernel tree: one run to build (not counted in the samples;
    cold unless an earlier bench left its build directory), then `runs` warm runs, each from start
    to its first test result line."""
    was_cold = not (build_dir / ".config").is_file()
    argv = [sys.executable, str(tree / "tools/testing/kunit/kunit.py"), "run", "--arch", "arm64",
            "--cross_compile", "aarch64-linux-gnu-", f"--build_dir={build_dir}", f"--jobs={os.cpu_count()}"]
    env = {"PYTHONDONTWRITEBYTECODE": "1"}      # the source tree is shared and never written
    first = _until_line(argv, FIRST_KUNIT_RESULT, timeout=3600, env=env, cwd=tree)
    warm = [_until_line(argv, FIRST_KUNIT_RESULT, timeout=900, env=env, cwd=tree) for _ in range(runs)]
    return {"seconds": round(first, 1), "cold": was_cold}, warm


# --- EL2: snapshots, tracing, the model ------------------------------------------------------------

def dwarf_parse_ms(kernel: KernelArtifacts, runs: int) -> tuple[list[float], list[float]]:
    """The vmlinux's DWARF parsed from nothing (a new layout cache each time), and from the cache."""
    from harness.el2 import symbols

    first, cached = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="pkvm-bench-dwarf-") as scratch:
            t = time.monotonic()
            symbols.load(kernel.vmlinux, Path(scratch))
            first.append((time.monotonic() - t) * 1000)
            t = time.monotonic()
            symbols.load(kernel.vmlinux, Path(scratch))
            cached.append((time.monotonic() - t) * 1000)
    return first, cached


def snapshot_pauses(kernel: KernelArtifacts, cache: Path, mem: str, count: int) -> list[float]:
    """ms the vCPUs stay paused for one EL2 snapshot, on a guest of `mem` MiB."""
    with tempfile.TemporaryDirectory(prefix="pkvm-bench-snap-") as run_dir:
        with _machine(cache, Path(run_dir), mem=mem).start(Path(run_dir)) as target, \
                El2Reader(target.qmp_socket, target.vmlinux, cache) as r:
            r.snapshot()                                   # DWARF and layout loaded once, not timed
            return [r.snapshot().pause_ms for _ in range(count)]


def free_block_reads(kernel: KernelArtifacts, cache: Path, count: int) -> tuple[list[float], list[float], int]:
    """A snapshot's pause with the contents of every free block read (free-blocks-zero) and
    without (that read replaced by nothing, here only), alternating; and the bytes read."""
    from unittest import mock

    from harness.el2 import decode

    with tempfile.TemporaryDirectory(prefix="pkvm-bench-free-") as run_dir:
        with _machine(cache, Path(run_dir)).start(Path(run_dir)) as target, \
                El2Reader(target.qmp_socket, target.vmlinux, cache) as r:
            snap = r.snapshot()
            free = sum(p.free_pages for p in snap.pools.values()) * 4096
            with_reads, without = [], []
            for _ in range(count):
                with_reads.append(r.snapshot().pause_ms)
                with mock.patch.object(decode, "_dirty_free", lambda *a: []):
                    without.append(r.snapshot().pause_ms)
            return with_reads, without, free


def traced_workload(mem: str, runs: int, workload: str = LIFECYCLE) -> list[dict]:
    """Per run: the workload untraced and traced, the calls traced, and the model's replay time."""
    cache = default_cache_dir()
    out = []
    with tempfile.TemporaryDirectory(prefix="pkvm-bench-trace-") as tmp:
        run_dir = Path(tmp)
        # the gdbstub tracer's own cost: no el2trace on this machine (it would pay for both)
        machine = _machine(cache, run_dir, payloads=True, gdb=True, mem=mem, el2_plugin="off")
        with machine.start(run_dir) as target, El2Reader(target.qmp_socket, target.vmlinux, cache) as reader:
            for _ in range(runs):
                t = time.monotonic()
                target.run(workload, timeout=300).check()
                plain = time.monotonic() - t
                with Tracer(reader, target.gdb_socket) as tracer:
                    tracer.start()
                    t = time.monotonic()
                    target.run(workload, timeout=600).check()
                    traced = time.monotonic() - t
                    trace = tracer.stop()
                t = time.perf_counter()
                result = replay_trace(trace)
                replay_s = time.perf_counter() - t
                out.append({"untraced_s": plain, "traced_s": traced, "ops": len(trace.ops),
                            "replay_s": replay_s, "divergences": 0 if result.ok else 1})
    return out


def model_replay_seconds(n_ops: int, runs: int, version: KernelVersion = MODEL_REFERENCE) -> list[float]:
    """bench/model.py's seeded random operations on a 1 GiB pool, recorded once, replayed `runs` times."""
    from model import POOLS, record, replay

    kinds, args = record(version, POOLS["1GiB"], n_ops, seed=20240611)
    return [replay(version, POOLS["1GiB"], kinds, args)[0] for _ in range(runs)]


def model_ops_per_s(n_ops: int, runs: int, version: KernelVersion = MODEL_REFERENCE) -> list[float]:
    return [n_ops / seconds for seconds in model_replay_seconds(n_ops, runs, version)]


def bisect_steps(cache: Path) -> list[float]:
    """Seconds of each step of a whole bisect whose kernels are all new (bench/bisect.py)."""
    from bisect_bench import run_bisect

    report = run_bisect(cache, fresh_kernels=True)
    return [s["seconds"] for s in report["steps"]]     # with --check-ends: the two ends are steps too


# --- error paths -------------------------------------------------------------------------------------

def fault_sweep(cache: Path, vcpus: int = 1) -> tuple[float, int, int]:
    """One full fault sweep of a `vcpus`-vCPU lifecycle (harness.sweep), el2trace off as the
    CLI's users run it for speed: its wall time, its runs and its unexplained findings."""
    from harness import sweep as sw

    with tempfile.TemporaryDirectory(prefix="pkvm-bench-sweep-") as run_dir:
        machine = _machine(cache, Path(run_dir), payloads=True, gdb=True, el2_plugin="off")
        with machine.start(Path(run_dir)) as target:
            def reopen() -> El2Reader:
                return El2Reader(target.qmp_socket, target.vmlinux, cache)

            m = sw.Machine(target, reopen(), reopen)
            try:
                result = sw.sweep(m, sw.lifecycle(GUEST_DIR, vcpus))
            finally:
                m.reader.close()
    return result.seconds, len(result.rows), len(result.findings)


def hostile_mix_rates(cache: Path, runs: int) -> tuple[list[float], list[float]]:
    """Hypercalls per second of the hostile host's random mix (harness.hostile), judged after
    every step (a snapshot, the invariants, the module pages' states) and unjudged, alternating,
    on the hostile-host test kernel; VM lifecycles are left out of the mixes timed here."""
    from harness.hostile import run_mix
    from harness.model.hostile import VM, mix
    from harness.targets.hostile import HostileHost

    on, off = [], []
    with tempfile.TemporaryDirectory(prefix="pkvm-bench-hostile-") as run_dir:
        machine = _machine(cache, Path(run_dir), payloads=True, el2_plugin="off",
                           kernel=KernelOptions(fragments=["pkvm-hostile-host"]))
        with machine.start(Path(run_dir)) as target, El2Reader(target.qmp_socket, target.vmlinux, cache) as r:
            host = HostileHost(target, r.kernel.hypercalls)
            for seed in range(runs):
                steps = [s for s in mix(seed, length=40) if s.op != VM]
                for checked, out in ((True, on), (False, off)):
                    got = run_mix(host, steps, lambda vcpus: "", r.snapshot if checked else None)
                    out.append(got.hypercalls / got.seconds)
    return on, off


@dataclass
class BoardFigures:
    first: list[float] = field(default_factory=list)     # s: the first snapshot through the dump
    warm: list[float] = field(default_factory=list)      # s: later ones
    qmp: list[float] = field(default_factory=list)       # s: the same machine's over QMP
    kib: float = 0.0                                     # KiB a warm dump moves
    ring_read: list[float] = field(default_factory=list)  # s: a window's calls read from the event ring
    ring_calls: int = 0                                  # calls in that window (one VM lifecycle)
    judged: list[float] = field(default_factory=list)    # s: the transitions since power-on read and followed
    transitions: int = 0                                 # how many (a boot and one VM lifecycle)


def board_snapshots(cache: Path, runs: int, kernel: str = "6.12") -> BoardFigures:
    """On the EL2-dump test kernel over SSH, as on a board: seconds per snapshot through the dump
    (the first, with its rounds; then warm), per QMP snapshot of the same machine, the KiB a warm
    dump moves, the time to read one VM lifecycle's calls from the event ring (the window's
    final snapshot excluded), and the time the board's transition oracle takes to read and follow
    every transition since power-on (a boot and that lifecycle; the snapshot excluded)."""
    from dataclasses import replace

    from harness.el2.dump import DumpMemory
    from harness.el2.ring import ALLOCATOR, read
    from harness.el2.ring_transitions import RingTransitions

    fig = BoardFigures()
    first, warm, qmp = fig.first, fig.warm, fig.qmp
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="pkvm-bench-board-") as run_dir:
            machine = _machine(cache, Path(run_dir), el2_plugin="off", payloads=True,
                               kernel=KernelOptions(kernel=kernel, fragments=["pkvm-el2-dump"]))
            machine = replace(machine, spec=replace(machine.spec, no_reboot=True))
            with machine.start(Path(run_dir), "ssh") as target, \
                    El2Reader(DumpMemory(target), target.vmlinux, cache) as dump, \
                    El2Reader(target.qmp_socket, target.vmlinux, cache) as over_qmp:
                t = time.monotonic()
                dump.snapshot()
                first.append(time.monotonic() - t)
                mem = dump.mem
                assert isinstance(mem, DumpMemory)
                before = (mem.dumps, mem.bytes_fetched)
                for _ in range(3):
                    t = time.monotonic()
                    dump.snapshot()
                    warm.append(time.monotonic() - t)
                    t = time.monotonic()
                    over_qmp.snapshot()
                    qmp.append(time.monotonic() - t)
                fig.kib = (mem.bytes_fetched - before[1]) / max(1, mem.dumps - before[0]) / 1024
                dump.snapshot()
                begin = ALLOCATOR.count(mem.last_ring)
                target.run(f"{GUEST_DIR}/pkvm_guest --vms 1 --vcpus 2 --pages 8").check()
                dump.snapshot()
                end, ring_pa = ALLOCATOR.count(mem.last_ring), dump.kpa(ALLOCATOR.symbol)
                t = time.monotonic()
                fig.ring_calls = len(read(mem, ALLOCATOR, ring_pa, begin, end))
                fig.ring_read.append(time.monotonic() - t)
                oracle, snap = RingTransitions(dump), dump.snapshot()
                t = time.monotonic()
                findings = oracle.check_transitions(snap)
                fig.judged.append(time.monotonic() - t)
                assert findings == [], findings
                fig.transitions = oracle.transitions.count
    return fig
