"""A kernel with a deliberately broken allocator (tests/mutants/01-free-list-head-insertion.patch:
freed blocks go to the head of their free list, not the tail). Replay must name the first
operation where the kernel and the model part. Marked slow: it builds a patched kernel (in the
re-patched tree shared with `make test-mutants`: cold the first time, ~9 minutes on 2 cores,
then incremental); run it with `make test-slow`."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.commands.trace import trace_command
from harness.image.payloads import GUEST_DIR
from harness.options import BootOptions, KernelOptions

PATCH = Path(__file__).resolve().parents[1] / "mutants" / "01-free-list-head-insertion.patch"


@pytest.mark.slow
def test_replay_names_the_first_divergence_on_a_broken_allocator(cache_dir, tmp_path):
    kopts = KernelOptions(patches=[PATCH])
    # Many VMs at once: their struct kvm and vCPU pages need hyp stage-1 tables from hpool, freed
    # at teardown in an order that leaves several order-0 blocks listed; the next allocation
    # then shows which end of the list the kernel takes. (A single VM's pool never holds two
    # blocks of one order, so it cannot tell the ends apart.)
    workload = f"for i in 1 2 3; do {GUEST_DIR}/pkvm_guest --vms 8 --vcpus 2 --pages 8 >/dev/null || exit 1; done"
    out = trace_command(kopts, BootOptions(), cache_dir, tmp_path, workload, quiet=True)
    d = out.replay.divergence
    assert d is not None, "the replay did not notice head insertion"
    assert d.op.split()[2].startswith("alloc(")                # an allocation got another page
    assert "the kernel returned" in d.reason and "the model predicts" in d.reason
    assert d.model_lists and d.kernel_lists is not None
    at = next(i for i, op in enumerate(out.trace.ops) if op.seq == d.seq)
    assert out.trace.ops[at].op == "alloc"
    assert all(op.seq < d.seq for op in out.trace.ops[:at])
    # The divergence is the mutant's own mark: an allocation whose answer comes from the other end
    # of a free list that held two blocks (the model's list, before the call, names both).
    order = out.trace.ops[at].args["order"]
    assert len(d.model_lists[order]) >= 2 and out.trace.ops[at].result in d.model_lists[order]
