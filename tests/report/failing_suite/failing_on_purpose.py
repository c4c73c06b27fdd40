"""A suite that fails on purpose on a live pKVM target, so the report tests render a real failing
run: one pass, one skip, and one failure with every kind of evidence (console, EL2 snapshot diff,
pool occupancy, and a trace replay that diverges because one traced call is removed, as if the
tracer had missed it). Not collected by `pytest tests` (its name does not start with test_);
tests/report/test_report_live.py runs it in a child pytest.
"""

from __future__ import annotations

import pytest

from harness.replay import replay_trace
from harness.targets.guests import guest_args, run_guests


def test_pkvm_is_up(target):
    assert target.mode in ("nVHE", "hVHE")


def test_skipped_with_a_reason():
    pytest.skip("shows how a skip reads in the report")


def test_a_trace_missing_one_allocation_diverges(target, payload, el2, el2_trace):
    with el2_trace() as box:
        run_guests(target, payload("pkvm_guest"), guest_args(vms=1, vcpus=1, pages=8))
    first_alloc = next(i for i, op in enumerate(box.trace.ops) if op.op == "alloc" and op.result)
    del box.trace.ops[first_alloc]           # the "missed" call
    box.result = replay_trace(box.trace)
    assert box.result.divergence is None, box.result.divergence.render()
