"""EL2 allocator tracing on a live 6.12 pKVM host, replayed in the model."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from harness.commands.trace import trace_command
from harness.el2 import lines as dwarf_lines
from harness.el2.snapshot import El2Reader
from harness.el2.trace import Tracer
from harness.image.payloads import GUEST_DIR
from harness.options import BootOptions, KernelOptions
from harness.replay import LiveReplay
from harness.report.run_coverage import el2_coverage
from harness.report.schema import problems
from tests.integration.conftest import HARNESS, assembled, qemu_pids_mentioning

LIFECYCLE = f"for i in 1 2 3; do {GUEST_DIR}/pkvm_guest --vms 2 --vcpus 3 --pages 16 || exit 1; done"
HEAVY = f"for i in 1 2 3; do {GUEST_DIR}/pkvm_guest --vms 8 --vcpus 2 --pages 8 >/dev/null || exit 1; done"


@pytest.fixture(scope="module")
def lifecycle(kernel, cache_dir, tmp_path_factory):
    """LIFECYCLE under el2trace (QEMU 10, the default): traced from power-on."""
    return trace_command(KernelOptions(), BootOptions(), cache_dir, tmp_path_factory.mktemp("lifecycle"),
                         LIFECYCLE, quiet=True)


@pytest.mark.parametrize("tracer", ["el2trace", "gdbstub"])
def test_vm_lifecycle_under_trace_replays_with_zero_divergences(kernel, cache_dir, tmp_path, lifecycle, tracer):
    out = lifecycle if tracer == "el2trace" else \
        trace_command(KernelOptions(), BootOptions(el2_plugin="off"), cache_dir, tmp_path, LIFECYCLE, quiet=True)
    result, trace = out.replay, out.trace
    assert result.ok, result.divergence.render() if result.divergence else result.final_mismatches
    assert len(trace.ops) >= 300 and trace.hits_ignored == 0
    assert result.per_pool["hpool"].get("alloc", 0) + result.per_pool["hpool"].get("put", 0) > 0
    assert sum(result.per_pool["host_s2_pool"].values()) > 100
    inits = [op for op in trace.ops if op.op == "init"]
    # 3 runs x 2 VMs, each torn down; from power-on also hpool's and host_s2_pool's own inits
    assert len(inits) == (8 if tracer == "el2trace" else 6) and len(result.dropped) == 6
    assert (trace.initial is None) == (tracer == "el2trace")
    allocs = [op for op in trace.ops if op.op == "alloc" and op.result is not None]
    assert len(allocs) >= 6 * 17                                  # PGD + reclaim per VM, each checked
    for name in ("trace.jsonl", "snapshot-initial.json", "snapshot-final.json", "command.log"):
        assert (out.run_dir / name).is_file()
    assert all(op.seen is not None for op in trace.ops if op.op in ("get", "put"))
    assert not qemu_pids_mentioning(str(tmp_path))


def test_el2trace_and_the_gdbstub_tracer_see_the_same_calls_on_each_vcpu(kernel, cache_dir, tmp_path):
    """One workload, both tracers at once: on each vCPU the gdbstub's calls are a run of el2trace's
    (el2trace also sees the calls just before the gdbstub armed and just after it detached)."""
    machine = assembled(cache_dir, tmp_path, gdb=True)
    assert machine.spec.plugin is not None
    with machine.start(tmp_path) as target, El2Reader(target.qmp_socket, target.vmlinux, cache_dir) as reader:
        live = LiveReplay(machine.spec.plugin[2], keep_ops=True)
        live.poll()
        booted = len(live.ops or [])
        with Tracer(reader, target.gdb_socket, emulate=False) as tracer:
            tracer.start()
            target.run(f"{GUEST_DIR}/pkvm_guest --vms 1 --vcpus 2 --pages 8").check()
            gdb = tracer.stop()
        reader.snapshot(while_paused=live.poll)
    assert live.ops is not None and live.replayer.divergence is None

    def key(op) -> tuple:
        return op.pool, op.op, tuple(sorted(op.args.items())), op.result, tuple(op.seen or ())

    for cpu in (0, 1):
        mine = [key(op) for op in live.ops[booted:] if op.cpu == cpu]
        theirs = [key(op) for op in gdb.ops if op.cpu == cpu]
        assert len(theirs) > 20
        starts = [i for i in range(len(mine) - len(theirs) + 1) if mine[i:i + len(theirs)] == theirs]
        assert starts, f"vCPU {cpu}: the gdbstub's {len(theirs)} calls are not a run of el2trace's {len(mine)}"


def test_el2_coverage_of_a_traced_run(lifecycle):
    """hyp_alloc_pages certainly ran; host_stage2_unmap_dev_all (host stage-2 pool pressure only)
    did not; the lines found are the DWARF line table's."""
    out = el2_coverage(lifecycle.run_dir)
    files = {s.file: s for s in out.files}
    page_alloc = files["arch/arm64/kvm/hyp/nvhe/page_alloc.c"]
    assert page_alloc.functions_hit >= 1 and page_alloc.lines_hit > 0
    assert "host_stage2_unmap_dev_all" in {f.name for f in out.never_run}
    assert "hyp_alloc_pages" not in {f.name for f in out.never_run}
    layout = json.loads((lifecycle.run_dir / "el2trace-layout.json").read_text())
    table = dwarf_lines.load(Path(layout["vmlinux"])).instrumentable()
    assert page_alloc.lines_found == len(table["arch/arm64/kvm/hyp/nvhe/page_alloc.c"])
    assert (out.out_dir / "coverage.info").is_file() and out.index.is_file()


def test_eight_vms_at_once_under_trace_replay_exactly(kernel, cache_dir, tmp_path):
    """Heavy traffic: ~4,800 calls, hundreds of gets and puts on single host stage-2 table pages.
    This is where a call recorded twice (a step that did not move, once hidden by an unread PC)
    used to show, as a refcount one too high."""
    out = trace_command(KernelOptions(), BootOptions(), cache_dir, tmp_path, HEAVY, quiet=True)
    result, trace = out.replay, out.trace
    assert result.ok, result.divergence.render() if result.divergence else result.final_mismatches
    assert len(trace.ops) >= 3000
    busiest = max(sum(1 for op in trace.ops if op.op in ("get", "put") and op.args["addr"] >> 12 == page)
                  for page in {op.args["addr"] >> 12 for op in trace.ops if op.op == "get"})
    assert busiest >= 100


def test_trace_and_offline_replay_from_the_cli(kernel, tmp_path):
    r = subprocess.run([*HARNESS, "trace", "-q", "--runs-dir", str(tmp_path), "--",
                        f"{GUEST_DIR}/pkvm_guest", "--vms", "1", "--vcpus", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS: 0 divergences" in r.stdout and "host_s2_pool" in r.stdout
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir() and not p.is_symlink())
    result = json.loads((run_dir / "result.json").read_text())
    assert problems(result) == [] and result["command"] == "trace" and result["outcome"] == "pass"
    assert result["operations"] > 0 and result["divergence"] is None and (run_dir / "junit.xml").is_file()
    again = subprocess.run([*HARNESS, "replay", str(run_dir / "trace.jsonl")], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and "PASS: 0 divergences" in again.stdout
    broken = subprocess.run([*HARNESS, "replay", str(tmp_path / "nope")], capture_output=True, text=True)
    assert broken.returncode == 2 and broken.stderr.count("\n") == 1


def test_the_machine_runs_on_after_the_tracer_is_closed_mid_trace(kernel, cache_dir, tmp_path):
    """Always detach: closing without stop() (an error, Ctrl-C) leaves a running machine."""
    with assembled(cache_dir, tmp_path, gdb=True).start(tmp_path) as target, \
            El2Reader(target.qmp_socket, target.vmlinux, cache_dir) as reader:
        with Tracer(reader, target.gdb_socket) as tracer:
            tracer.start()
            target.run(f"{GUEST_DIR}/kvm_caps").check()
            assert tracer.ops                                     # it was tracing
        start = time.monotonic()
        assert target.run(f"{GUEST_DIR}/pkvm_guest --vms 1").check().stdout.endswith("done\n")
        assert time.monotonic() - start < 30
        assert reader.mem.running()
