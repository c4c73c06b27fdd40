"""7.2 boards: the dump kernel's cross-checks on Linux 7.2, proved on QEMU (`make test-slow`).

7.2.13 takes the same overlay as 7.3 (placed by pattern). A cold 7.2 dump build is about 10 min,
more than `make test` can spare. The checks are 7.3's (test_board_events.py): QMP and the dump
read the same, the event ring holds the gdbstub tracer's calls and replays from power-on, and its
transitions are el2trace's.
"""

from __future__ import annotations

import pytest

from harness.model.transitions import HOST_HYP_FUNCTIONS
from harness.options import KernelOptions
from tests.integration.test_board_el2 import (
    assert_reads_the_same,
    assert_ring_holds_the_gdbstub_calls,
    assert_transitions_as_el2trace_sees_them,
    board_fixtures,
)

pytestmark = pytest.mark.slow

KERNEL = KernelOptions(kernel="7.2", fragments=("pkvm-el2-dump",))


board, both = board_fixtures(KERNEL, "board72")


def test_qmp_and_the_dump_read_the_same_on_7_2(both):
    assert_reads_the_same(*both)


def test_the_event_ring_holds_the_gdbstub_tracers_calls_on_7_2(board, both):
    assert_ring_holds_the_gdbstub_calls(board, *both)


def test_the_rings_transitions_are_el2traces_on_7_2(board, both):
    assert_transitions_as_el2trace_sees_them(board, both[1], set(HOST_HYP_FUNCTIONS))
