"""A board's EL2, read through the test kernel's dump (CONFIG_PKVM_EL2_DUMP), proved on QEMU.

The guest runs the 6.12 test kernel built with `--config pkvm-el2-dump`; it is reached over SSH
(its dropbear stands in for a board's sshd). The same machine is read both ways, QMP and the
dump file, and the two snapshots must be equal; then the EL2 suites run against it as a board,
with `--pkvm-target ssh://`, and must run their EL2 checks instead of skipping.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from harness.el2 import ring
from harness.el2.dump import FILE, DumpBusy, DumpMemory, check_vmlinux, running_build_id
from harness.el2.gdbstub import GdbStub
from harness.el2.ring import RingHistory, RingTracer
from harness.el2.ring_transitions import RingCalls
from harness.el2.snapshot import NVHE, El2Reader, SnapshotBusy
from harness.el2.tcg.probes import Layout
from harness.el2.tcg.stream import Calls, Follower
from harness.el2.trace import Tracer
from harness.errors import UsageError
from harness.image.keys import ensure_keys
from harness.image.payloads import GUEST_DIR
from harness.model.transitions import HOST_HYP_FUNCTIONS, Transition
from harness.options import KernelOptions
from harness.replay import replay_trace, replay_window
from tests.integration.conftest import assembled

REPO = Path(__file__).resolve().parents[2]
DUMP_KERNEL = KernelOptions(fragments=("pkvm-el2-dump",))


def start_board(cache_dir, run_dir, kernel: KernelOptions):
    """A dump test kernel under QEMU, over SSH, with a gdbstub (to hold an EL2 lock by hand)."""
    machine = assembled(cache_dir, run_dir, kernel, gdb=True)
    return replace(machine, spec=replace(machine.spec, no_reboot=True)).start(run_dir, "ssh")


@contextlib.contextmanager
def readers(board, cache_dir) -> Iterator[tuple[El2Reader, El2Reader]]:
    """The same machine read both ways: (over QMP, through the dump)."""
    qmp = El2Reader(board.qmp_socket, board.vmlinux, cache_dir)
    dump = El2Reader(DumpMemory(board), board.vmlinux, cache_dir)
    try:
        yield qmp, dump
    finally:
        qmp.close()
        dump.close()


def board_fixtures(kernel: KernelOptions, name: str):
    """A module's `board` (the dump kernel, booted once) and `both` (it read both ways) fixtures."""

    @pytest.fixture(scope="module")
    def board(cache_dir, tmp_path_factory):
        t = start_board(cache_dir, tmp_path_factory.mktemp(name), kernel)
        yield t
        t.close()

    @pytest.fixture(scope="module")
    def both(board, cache_dir):
        with readers(board, cache_dir) as pair:
            yield pair

    return board, both


board, both = board_fixtures(DUMP_KERNEL, "board")


@contextlib.contextmanager
def lock_held(board, lock_pa: int) -> Iterator[None]:
    """A hyp spinlock made to look held (next = owner + 1) through the gdbstub, then restored."""
    with GdbStub(board.gdb_socket) as gdb:
        word = gdb.read_physical(lock_pa, 4)
        gdb.write_physical(lock_pa + 2, ((int.from_bytes(word[:2], "little") + 1) & 0xFFFF).to_bytes(2, "little"))
        gdb.detach()
    try:
        yield
    finally:
        with GdbStub(board.gdb_socket) as gdb:
            gdb.write_physical(lock_pa, word)
            gdb.detach()


def _key(op) -> tuple:
    return op.pool, op.op, tuple(sorted(op.args.items())), op.result, tuple(op.seen or ())


def traced_both_ways(board, qmp: El2Reader, tracer):
    """One VM lifecycle traced at once by the board's own record (`tracer`: a RingTracer or a
    RemoteTracer over the dump) and the gdbstub tracer over QMP: (the board's, the gdbstub's)."""
    tracer.start()
    with Tracer(qmp, board.gdb_socket) as gdb_tracer:
        gdb_tracer.start()
        board.run(f"{GUEST_DIR}/pkvm_guest --vms 1 --vcpus 2 --pages 8").check()
        gdb = gdb_tracer.stop()
    return tracer.stop(), gdb


def assert_runs_of(board_trace, gdb_trace, at_least: int = 50) -> None:
    """On each vCPU, the gdbstub's calls are a run of the board's record of them (which also has
    the calls just before the gdbstub armed and after it left), field for field: pool, call,
    arguments, result, and the page's refcount and order at entry."""
    assert len(gdb_trace.ops) >= at_least and len(board_trace.ops) >= len(gdb_trace.ops)
    for cpu in sorted({op.cpu for op in gdb_trace.ops}):
        mine = [_key(op) for op in board_trace.ops if op.cpu == cpu]
        theirs = [_key(op) for op in gdb_trace.ops if op.cpu == cpu]
        starts = [i for i in range(len(mine) - len(theirs) + 1) if mine[i:i + len(theirs)] == theirs]
        assert starts, f"vCPU {cpu}: the gdbstub's {len(theirs)} calls are not a run of the board's {len(mine)}"


def _comparable(snap) -> dict:
    d = snap.to_dict()
    for k in ("taken_at", "pause_ms", "attempts"):
        d.pop(k, None)
    return d


def _sandwich(qmp: El2Reader, dump: El2Reader, tries: int = 10) -> tuple[dict, dict, int]:
    """A QMP snapshot between two dumps that are equal, so nothing changed across it. The host
    faults its memory into its stage-2 lazily (each command over SSH may map another block), so
    a quiet instant is waited for."""
    for n in range(1, tries + 1):
        first = _comparable(dump.snapshot())
        over_qmp = _comparable(qmp.snapshot())
        second = _comparable(dump.snapshot())
        if first == second:
            return over_qmp, second, n
    raise AssertionError(f"no two dumps {tries} times running were equal: the system never was quiescent")


def assert_reads_the_same(qmp: El2Reader, dump: El2Reader) -> None:
    """A quiescent system read through QMP and through the dump: equal, pool by pool and part by part."""
    over_qmp, over_dump, tries = _sandwich(qmp, dump)
    per = dump.mem.dumps
    print(f"equal dumps around a QMP snapshot after {tries} tries; {per} dumps, "
          f"{dump.mem.bytes_fetched / per / 1024:.0f} KiB each, {dump.mem.seconds / per:.2f} s each")
    assert over_qmp["unavailable"] == {} and over_dump["unavailable"] == {}
    assert set(over_qmp["pools"]) == set(over_dump["pools"]) >= {"hpool", "host_s2_pool"}
    for name, pool in over_qmp["pools"].items():
        assert over_dump["pools"][name] == pool, f"pool {name} differs between QMP and the dump"
    for part in over_qmp:
        assert over_dump[part] == over_qmp[part], f"{part} differs between QMP and the dump"


def test_a_quiescent_system_reads_the_same_through_qmp_and_the_dump(both):
    assert_reads_the_same(*both)
    assert both[1].rounds == 1              # the pages the last snapshot read were asked for up front


def test_the_same_holds_with_a_vm_running(board, both):
    """A VM's pool and stage-2 live in memory the host donated: the dump has to ask for them."""
    qmp, dump = both
    board.run("/opt/pkvm-harness/bin/pkvm_guest --vms 1 --pages 4 --hold 30 > /tmp/vm.log 2>&1 &").check()
    try:
        for _ in range(60):
            snap = dump.snapshot()
            if snap.vms:
                break
        assert snap.vms, "no VM appeared at EL2"
        board.run("kill -STOP $(pidof pkvm_guest)").check()    # quiescent: the VM stays, and stops running
        try:
            over_qmp, over_dump, _ = _sandwich(qmp, dump)
        finally:
            board.run("kill -CONT $(pidof pkvm_guest)")
        assert over_qmp["vms"] and over_dump["vms"] == over_qmp["vms"]
        assert over_dump == over_qmp
    finally:
        board.run("kill $(pidof pkvm_guest) 2>/dev/null; sleep 1")


def assert_ring_holds_the_gdbstub_calls(board, qmp: El2Reader, dump: El2Reader, at_least: int = 50) -> None:
    """One VM lifecycle traced by the dump kernel's ring and the gdbstub at once: the gdbstub's calls
    are a run of the ring's on each vCPU, the ring's window replays against the model with no
    divergence, and so does every call since power-on."""
    assert RingTracer.available(dump)
    tracer = RingTracer(dump, RingHistory())
    window, gdb = traced_both_ways(board, qmp, tracer)
    result = replay_trace(window)
    print(f"{len(window.ops)} calls in the ring's window, {len(gdb.ops)} traced by the gdbstub; "
          f"replay: {result.ok}")
    assert result.ok, (result.divergence, result.final_mismatches[:5])
    assert_runs_of(window, gdb, at_least)
    assert {op.op for op in window.ops} >= {"alloc", "get", "put"}
    assert_replays_from_boot(tracer, window)


def test_the_event_ring_holds_the_gdbstub_tracers_calls(board, both):
    assert_ring_holds_the_gdbstub_calls(board, *both)


def assert_replays_from_boot(tracer, window) -> None:
    """The ring still holds every call since power-on: replayed from the pools' inits, the model
    ends where the kernel is, the window's calls last."""
    boot = tracer.from_boot()
    assert boot is not None, tracer.history.lost
    assert boot.ops[0].op == "init" and [_key(op) for op in boot.ops[-len(window.ops):]] == \
        [_key(op) for op in window.ops]
    result = replay_trace(boot)
    print(f"{len(boot.ops)} calls from power-on replayed: {result.ok}")
    assert result.ok, (result.divergence, result.final_mismatches[:5])
    # the el2_trace fixture's result: the window as the last calls from power-on, counted alone
    alone, (sliced, before) = replay_trace(window), replay_window(boot, window)
    assert before == [] and sliced.ok, (before[:5], sliced.divergence, sliced.final_mismatches[:5])
    assert (sliced.ops, sliced.per_pool, sliced.dropped) == (alone.ops, alone.per_pool, alone.dropped)


def ring_transitions(dump: El2Reader) -> list[Transition]:
    """Every host/hyp transition the ring holds from power-on, to the instant of a fresh snapshot."""
    dump.snapshot()
    end = ring.TRANSITIONS.count(dump.mem.last_ring)
    entries = ring.read(dump.mem, ring.TRANSITIONS, dump.kpa(ring.TRANSITIONS.symbol), 0, end)
    return [t for t in RingCalls(dump.kernel.hypercalls).feed(entries) if isinstance(t, Transition)]


def el2trace_transitions(board, at_least: int, deadline: float = 60.0) -> list[Transition]:
    """Every transition el2trace (the machine's TCG plugin) has streamed from power-on, once it
    has streamed `at_least` (it writes each as it happens; the deadline bounds the wait)."""
    stream = board.spec.plugin[2]
    calls = Calls(Layout.from_json(stream.with_name("el2trace-layout.json").read_text()))
    follower = Follower(stream)
    until = time.monotonic() + deadline
    while True:
        calls.feed(follower.new_records())
        if len(calls.transitions) >= at_least or time.monotonic() > until:
            return calls.transitions
        time.sleep(0.5)


def _call(t: Transition) -> tuple:
    """A transition as the checker judges it: the scan of a refused call is not read (el2trace
    scans what it can reach, the ring only what the hyp maps: 7.x's ownership selftest makes such
    calls at boot)."""
    return t.name, t.pa, t.nr_pages, t.ret, t.hypercall, t.scan if t.ret == 0 else None


def assert_transitions_as_el2trace_sees_them(board, dump: El2Reader, functions: set[str]) -> None:
    """The ring's transitions from power-on are el2trace's, call for call on each CPU: function,
    pages, return, the hypercall it ran under and the scan of what a donation moved."""
    assert board.spec.plugin is not None, "this QEMU cannot run el2trace: nothing to check the ring against"
    board.run(f"{GUEST_DIR}/pkvm_guest --vms 1 --vcpus 2 --pages 8").check()
    mine = ring_transitions(dump)
    # the host/guest calls of 6.14+ are el2trace's alone (the ring does not record them)
    theirs = [t for t in el2trace_transitions(board, len(mine)) if t.name in HOST_HYP_FUNCTIONS]
    print(f"{len(mine)} transitions in the ring from power-on, {len(theirs)} traced by el2trace: "
          + ", ".join(f"{n} {sum(t.name == n for t in mine)}" for n in sorted({t.name for t in mine})))
    assert {t.name for t in mine} == functions
    for cpu in sorted({t.vcpu for t in mine} | {t.vcpu for t in theirs}):
        assert [_call(t) for t in mine if t.vcpu == cpu] == [_call(t) for t in theirs if t.vcpu == cpu], f"CPU {cpu}"
    assert any(t.scan is not None for t in mine) == bool(functions & {"__pkvm_hyp_donate_host"})


def test_the_rings_transitions_are_el2traces(board, both):
    """The board's transition oracle reads the ring; on QEMU el2trace sees the same calls."""
    _, dump = both
    assert_transitions_as_el2trace_sees_them(board, dump, set(HOST_HYP_FUNCTIONS))


def test_the_dump_refuses_while_the_hyp_stage1_lock_is_held(board, both):
    """EL2 refuses (-EBUSY) while pkvm_pgd_lock is held, and the reader retries, then gives up
    saying so; once the lock is free the snapshot is taken."""
    _, dump = both
    lock_pa = dump.kpa(NVHE + "pkvm_pgd_lock")
    with lock_held(board, lock_pa):
        with pytest.raises(DumpBusy):
            dump.mem.take([lock_pa & -4096])
        with pytest.raises(SnapshotBusy):
            dump.snapshot(attempts=3)
    assert dump.snapshot().pools


def test_a_pool_lock_held_is_busy_as_over_qmp(board, both):
    _, dump = both
    snap = dump.snapshot()
    lock_pa = snap.pools["hpool"].struct_pa + dump.kernel.struct("hyp_pool").offset("lock")
    with lock_held(board, lock_pa), pytest.raises(SnapshotBusy):
        dump.snapshot(attempts=2)


def test_the_dump_reads_never_write_el2(board, both):
    """Bad requests are refused whole with a clear errno, and no request changes EL2 state. The
    host maps its memory into its stage-2 lazily (each command over SSH may fault a page in), so
    the requests are made until once nothing else changed around them either: a request that
    wrote EL2 would change it every time."""
    qmp, _ = both
    changed = []
    for _ in range(5):
        before = _comparable(qmp.snapshot())
        assert not board.run(f"printf '0x1001 1\\n' > {FILE}").ok           # not page-aligned
        assert not board.run(f"printf '0x40000000 40000\\n' > {FILE}").ok   # past the 128 MiB a request
        after = _comparable(qmp.snapshot())
        if after == before:
            return
        changed.append(sorted(part for part in after if after[part] != before.get(part)))
    raise AssertionError(f"EL2 changed around the refused requests in all 5 tries: {changed}")


def test_a_vmlinux_that_is_not_the_running_kernel_is_refused(board, kernel, cache_dir):
    assert running_build_id(board) is not None
    check_vmlinux(board, board.vmlinux, cache_dir)
    with pytest.raises(UsageError, match="runs the kernel with build ID"):
        check_vmlinux(board, kernel.vmlinux, cache_dir)      # the default kernel's


def _as_board(board, cache_dir, tmp_path, *suites: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    keys = ensure_keys(cache_dir)
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{board.spec.ssh_port} {keys.host_public_line}\n")
    return subprocess.run([sys.executable, "-m", "pytest", *[str(REPO / "test_suites" / s) for s in suites],
                           "-q", "-rs", "-p", "no:cacheprovider",
                           "--pkvm-target", f"ssh://root@127.0.0.1:{board.spec.ssh_port}",
                           "--pkvm-ssh-key", str(keys.client_private), "--pkvm-ssh-known-hosts", str(kh),
                           "--pkvm-config", "pkvm-el2-dump", *extra,
                           "--pkvm-run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=1800, cwd=REPO)


@pytest.mark.slow
def test_the_el2_suites_run_their_checks_on_a_board(board, cache_dir, tmp_path):
    """About 6 min: `make test-slow`."""
    r = _as_board(board, cache_dir, tmp_path, "allocator", "stage2")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    skips = re.findall(r"^SKIPPED .*$", r.stdout, re.MULTILINE)
    print("\n".join([*skips, r.stdout.strip().splitlines()[-1]]))
    el2_skips = [s for s in skips if "EL2 memory cannot be read" in s or "needs_el2" in s or "trace through" in s]
    assert el2_skips == [], "\n".join(el2_skips)      # the traced tests run on the event ring
    assert int(re.search(r"(\d+) passed", r.stdout).group(1)) >= 10, r.stdout[-2000:]


def test_build_board_builds_the_dump_kernel_and_says_what_to_install(board):
    from tests.integration.conftest import run_cli

    r = run_cli("build", "--board", "--kernel", "6.12")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert f"{board.vmlinux.parent}" in out                      # the same kernel the board runs here
    assert f"install {board.vmlinux.parent / 'Image'} on the board" in out
    assert "--pkvm-target ssh://root@BOARD --pkvm-kernel 6.12 --pkvm-config pkvm-el2-dump" in out
