"""EL2 allocator tracing on a live 6.12 pKVM host, replayed in the model."""

from __future__ import annotations

import json
import subprocess
import time

from harness.commands.trace import trace_command
from harness.el2.snapshot import El2Reader
from harness.el2.trace import Tracer
from harness.image.payloads import GUEST_DIR
from harness.options import BootOptions, KernelOptions
from harness.report.schema import problems
from tests.integration.conftest import HARNESS, assembled, qemu_pids_mentioning

LIFECYCLE = f"for i in 1 2 3; do {GUEST_DIR}/pkvm_guest --vms 2 --vcpus 3 --pages 16 || exit 1; done"
HEAVY = f"for i in 1 2 3; do {GUEST_DIR}/pkvm_guest --vms 8 --vcpus 2 --pages 8 >/dev/null || exit 1; done"


def test_vm_lifecycle_under_trace_replays_with_zero_divergences(kernel, cache_dir, tmp_path):
    out = trace_command(KernelOptions(), BootOptions(), cache_dir, tmp_path, LIFECYCLE, quiet=True)
    result, trace = out.replay, out.trace
    assert result.ok, result.divergence.render() if result.divergence else result.final_mismatches
    assert len(trace.ops) >= 300 and trace.hits_ignored == 0
    assert result.per_pool["hpool"].get("alloc", 0) + result.per_pool["hpool"].get("put", 0) > 0
    assert sum(result.per_pool["host_s2_pool"].values()) > 100
    inits = [op for op in trace.ops if op.op == "init"]
    assert len(inits) == 6 and len(result.dropped) == 6          # 3 runs x 2 VMs, each torn down
    allocs = [op for op in trace.ops if op.op == "alloc" and op.result is not None]
    assert len(allocs) >= 6 * 17                                  # PGD + reclaim per VM, each checked
    for name in ("trace.jsonl", "snapshot-initial.json", "snapshot-final.json", "command.log"):
        assert (out.run_dir / name).is_file()
    assert all(op.seen is not None for op in trace.ops if op.op in ("get", "put"))
    assert not qemu_pids_mentioning(str(tmp_path))


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
