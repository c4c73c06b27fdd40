"""6.1 boards: the EL2 dump without a hyp fixmap, proved on QEMU.

6.1 has no hyp fixmap, so its dump kernel copies through the hyp's linear map into a page the host
shared with it at boot, and leaves pages only the host owns to the host (el2_dump.c,
PKH_NO_HYP_FIXMAP). Its event ring is 6.12's. The same checks as 6.12's (test_board_el2.py): QMP
and the dump read the same, the ring holds the gdbstub tracer's calls and el2trace's transitions,
and (slow) the EL2 suites run over SSH. A cold 6.1 dump build is about 6 min.
"""

from __future__ import annotations

import re

import pytest

from harness.options import KernelOptions
from tests.integration.test_board_el2 import (
    _as_board,
    assert_reads_the_same,
    assert_ring_holds_the_gdbstub_calls,
    assert_transitions_as_el2trace_sees_them,
    board_fixtures,
)

KERNEL = KernelOptions(kernel="6.1", fragments=("pkvm-el2-dump",))


board, both = board_fixtures(KERNEL, "board61")


def test_qmp_and_the_dump_read_the_same_on_6_1(both):
    assert_reads_the_same(*both)


def test_the_event_ring_holds_the_gdbstub_tracers_calls_on_6_1(board, both):
    assert_ring_holds_the_gdbstub_calls(board, *both, at_least=30)   # 6.1's lifecycle: 42 calls (no VM pools)


def test_the_rings_transitions_are_el2traces_on_6_1(board, both):
    """6.1 has only the share pair between host and hyp (no donations, no pins)."""
    _, dump = both
    assert_transitions_as_el2trace_sees_them(board, dump, {"__pkvm_host_share_hyp", "__pkvm_host_unshare_hyp"})


@pytest.mark.slow
def test_the_el2_suites_run_their_checks_on_a_6_1_board(board, cache_dir, tmp_path):
    r = _as_board(board, cache_dir, tmp_path, "allocator", "stage2", extra=("--pkvm-kernel", "6.1"))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    skips = re.findall(r"^SKIPPED .*$", r.stdout, re.MULTILINE)
    print("\n".join([*skips, r.stdout.strip().splitlines()[-1]]))
    el2_skips = [s for s in skips if "EL2 memory cannot be read" in s or "needs_el2" in s or "trace through" in s]
    assert el2_skips == [], "\n".join(el2_skips)
