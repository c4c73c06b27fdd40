"""7.2 boards: the dump kernel's cross-checks on Linux 7.2, proved on QEMU (`make test-slow`).

7.2.13 takes the same overlay as 7.3 (placed by pattern). A cold 7.2 dump build is about 10 min,
more than `make test` can spare. The checks are 7.3's (test_board_events.py): QMP and the dump
read the same, the event ring holds the gdbstub tracer's calls and replays from power-on, and its
transitions are el2trace's.
"""

from __future__ import annotations

import pytest

from harness.el2.ring import RingHistory, RingTracer
from harness.model.transitions import HOST_HYP_FUNCTIONS
from harness.options import KernelOptions
from harness.replay import replay_trace
from tests.integration.test_board_el2 import (
    _sandwich,
    assert_replays_from_boot,
    assert_runs_of,
    assert_transitions_as_el2trace_sees_them,
    board_fixtures,
    traced_both_ways,
)

pytestmark = pytest.mark.slow

KERNEL = KernelOptions(kernel="7.2", fragments=("pkvm-el2-dump",))


board, both = board_fixtures(KERNEL, "board72")


def test_qmp_and_the_dump_read_the_same_on_7_2(both):
    over_qmp, over_dump, _ = _sandwich(*both)
    assert over_qmp["unavailable"] == {} and over_dump == over_qmp


def test_the_event_ring_holds_the_gdbstub_tracers_calls_on_7_2(board, both):
    qmp, dump = both
    tracer = RingTracer(dump, RingHistory())
    window, gdb = traced_both_ways(board, qmp, tracer)
    result = replay_trace(window)
    print(f"{len(window.ops)} calls in the ring's window, {len(gdb.ops)} traced by the gdbstub")
    assert result.ok, (result.divergence, result.final_mismatches[:5])
    assert_runs_of(window, gdb)
    assert_replays_from_boot(tracer, window)


def test_the_rings_transitions_are_el2traces_on_7_2(board, both):
    _, dump = both
    assert_transitions_as_el2trace_sees_them(board, dump, set(HOST_HYP_FUNCTIONS))
