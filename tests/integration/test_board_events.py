"""7.x boards: EL2 through the dump, its event ring and the hypervisor's own trace events, proved on QEMU.

The guest runs the 7.3 test kernel built with `--config pkvm-el2-dump` (the dump, its event ring,
and the pkh_* hypervisor events in its trace remote), reached over SSH. About 6 min with the kernel built
(`make test-slow`): a cold 7.3 build adds about 10 min, more than `make test` can spare.
"""

from __future__ import annotations

import re

import pytest

from harness.el2.events import RemoteTracer
from harness.model.transitions import HOST_HYP_FUNCTIONS
from harness.options import KernelOptions
from harness.replay import replay_trace
from tests.integration.test_board_el2 import (
    _as_board,
    assert_reads_the_same,
    assert_ring_holds_the_gdbstub_calls,
    assert_runs_of,
    assert_transitions_as_el2trace_sees_them,
    board_fixtures,
    traced_both_ways,
)

pytestmark = pytest.mark.slow

KERNEL = KernelOptions(kernel="7.3", fragments=("pkvm-el2-dump",))


board, both = board_fixtures(KERNEL, "board73")


def test_qmp_and_the_dump_read_the_same_on_7_3(both):
    assert_reads_the_same(*both)


def test_the_hypervisor_events_are_the_gdbstub_tracers_calls(board, both):
    """One VM lifecycle traced both ways at once: the gdbstub's calls are in the events, and the
    events' window replays against the model."""
    qmp, dump = both
    assert RemoteTracer.available(board)
    events, gdb = traced_both_ways(board, qmp, RemoteTracer(dump, board))
    result = replay_trace(events)
    assert result.ok, (result.divergence, result.final_mismatches[:5])
    assert_runs_of(events, gdb)


def test_the_event_ring_holds_the_gdbstub_tracers_calls_on_7_3(board, both):
    """The board's suites trace through the ring on 7.x too: one lock orders it across CPUs."""
    assert_ring_holds_the_gdbstub_calls(board, *both)


def test_the_rings_transitions_are_el2traces_on_7_3(board, both):
    _, dump = both
    assert_transitions_as_el2trace_sees_them(board, dump, set(HOST_HYP_FUNCTIONS))


def test_the_el2_suites_run_their_checks_and_traces_on_a_7_3_board(board, cache_dir, tmp_path):
    """The allocator and stage-2 suites as on a board: the EL2 checks through the dump, the traced
    tests (replay against the model) and the transition oracle through the ring. Only the
    gdbstub's fault injection may skip."""
    r = _as_board(board, cache_dir, tmp_path, "allocator", "stage2", extra=("--pkvm-kernel", "7.3"))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    skips = re.findall(r"^SKIPPED .*$", r.stdout, re.MULTILINE)
    assert all("no gdbstub to fail" in s for s in skips), "\n".join(skips)
    assert int(re.search(r"(\d+) passed", r.stdout).group(1)) >= 16, r.stdout[-2000:]
