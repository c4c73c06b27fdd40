"""Host stage-2 predictions on hand-built memblock layouts (worked from mem_protect.c:348-547
of 6.12 and the 6.16 / 7.0 fixes), and page-state transitions."""

from __future__ import annotations

import pytest

from harness.kernel.version import KernelVersion
from harness.model.stage2 import (
    HostAbortError,
    IllegalTransition,
    PageStates,
    Region,
    State,
    find_mem_range,
    predict_fault,
)

GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10
RAM = [Region(0x4000_0000, 2 * GiB)]


def test_find_mem_range_memory_and_gaps():
    regions = [Region(0x4000_0000, GiB), Region(0x1_0000_0000, GiB)]
    r = find_mem_range(0x4000_1000, regions)
    assert (r.start, r.end, r.is_memory) == (0x4000_0000, 0x8000_0000, True)
    gap = find_mem_range(0x9000_0000, regions)
    assert (gap.start, gap.end, gap.is_memory) == (0x8000_0000, 0x1_0000_0000, False)
    low = find_mem_range(0x0900_0000, regions)
    assert (low.start, low.end) == (0, 0x4000_0000)
    high = find_mem_range(0x100_0000_0000, regions)
    assert (high.start, high.end) == (0x1_4000_0000, 1 << 64)


def test_a_1gib_block_inside_ram():
    p = predict_fault(0x4000_1234, RAM, walk_level=1)
    assert (p.start, p.size, p.granule_level, p.leaf_level, p.leaves) == (0x4000_0000, GiB, 1, 1, 1)
    assert (p.prot, p.xn, p.table_pages) == ("RWX", False, 0)
    # the same fault when the walk stopped at level 0: one level-1 table, then the block
    assert predict_fault(0x4000_1234, RAM, walk_level=0).table_pages == 1


def test_2mib_at_an_unaligned_ram_end_then_4k_past_the_last_whole_2mib():
    ram = [Region(0x4000_0000, GiB + 3 * MiB)]           # ends at 0x8030_0000
    p = predict_fault(0x8010_0000, ram, walk_level=1)
    assert (p.start, p.size, p.leaf_level, p.table_pages) == (0x8000_0000, 2 * MiB, 2, 1)
    q = predict_fault(0x8020_1000, ram, walk_level=1)     # its 2 MiB would run past the end
    assert (q.start, q.size, q.leaf_level, q.table_pages) == (0x8020_1000, 4 * KiB, 3, 2)


def test_4k_next_to_a_hyp_owned_page_and_the_hyp_page_itself():
    # A hyp-owned page forced level-3 tables around it: the neighbour's walk stops at level 3.
    p = predict_fault(0x7F40_1000, RAM, walk_level=3)
    assert (p.start, p.size, p.leaf_level, p.table_pages, p.prot) == (0x7F40_1000, 4 * KiB, 3, 0, "RWX")
    with pytest.raises(HostAbortError) as e:
        predict_fault(0x7F40_0000, RAM, walk_level=3, walk_pte=0x4)
    assert e.value.errno == "EPERM" and "BUG_ON" in str(e.value)
    with pytest.raises(HostAbortError) as e:
        predict_fault(0x7F40_2000, RAM, walk_level=3, walk_pte=0x4000_0000_0000_07C3)
    assert e.value.errno == "EAGAIN"


def test_a_high_mmio_address_6_12_quirk_and_the_fix():
    addr = 0x80_0000_1000                                  # 512 GiB, above RAM, empty level-0 entry
    p = predict_fault(addr, RAM, walk_level=0)
    assert (p.start, p.size, p.granule_level) == (0x80_0000_0000, 512 * GiB, 0)
    assert (p.leaf_level, p.leaves, p.table_pages, p.prot, p.xn) == (1, 512, 1, "RW", True)
    fixed = predict_fault(addr, RAM, walk_level=0, version=KernelVersion(6, 16))
    assert (fixed.start, fixed.size, fixed.leaf_level, fixed.leaves, fixed.table_pages) == \
        (0x80_0000_0000, GiB, 1, 1, 1)


def test_a_page_outside_a_non_page_aligned_memblock():
    ram = [Region(0x4000_0000, 0x800)]                     # half a page of RAM
    quirk = predict_fault(0x4000_0000, ram, walk_level=1)
    assert (quirk.size, quirk.leaf_level) == (4 * KiB, 3)  # 6.12: the loop always ends with a page
    with pytest.raises(HostAbortError) as e:
        predict_fault(0x4000_0000, ram, walk_level=1, version=KernelVersion(6, 16))
    assert e.value.errno == "EINVAL"                       # 6.16: WARN_ON, a hyp panic
    assert predict_fault(0x4000_0000, ram, walk_level=1, version=KernelVersion(7, 0)).size == 4 * KiB   # 7.0 fallback


def test_page_states_share_unshare_donate():
    s = PageStates.empty()
    pa = 0x4100_0000
    assert s.view(pa) == (State.OWNED, State.NOPAGE)
    s.apply("host_share_hyp", pa, 2)
    assert s.view(pa + 4096) == (State.SHARED_OWNED, State.SHARED_BORROWED)
    s.apply("host_unshare_hyp", pa, 2)
    assert s.view(pa) == (State.OWNED, State.NOPAGE)
    s.apply("host_donate_hyp", pa)
    assert s.view(pa) == (State.NOPAGE, State.OWNED)
    s.apply("hyp_donate_host", pa)
    assert s.view(pa) == (State.OWNED, State.NOPAGE)


def test_illegal_transitions_change_nothing():
    s = PageStates.empty()
    pa = 0x4100_0000
    s.apply("host_share_hyp", pa + 4096)
    with pytest.raises(IllegalTransition, match="host state SHARED_OWNED, needs OWNED"):
        s.apply("host_donate_hyp", pa, 2)                  # the second page is shared
    assert s.view(pa) == (State.OWNED, State.NOPAGE)      # all or nothing
    with pytest.raises(IllegalTransition, match="__host_check_page_state_range"):
        s.apply("host_unshare_hyp", pa)
    s.pins[pa + 4096] = 1
    with pytest.raises(IllegalTransition, match="EBUSY"):
        s.apply("host_unshare_hyp", pa + 4096)


def test_untouched_addresses_are_found_per_leaf_level():
    """A level-2 table with one 4 KiB page mapped under a level-3 table: the rest of that 2 MiB
    maps as pages, the next empty 2 MiB entry as a block."""
    from harness.el2.pgtable import Leaf, Walk
    from harness.model.stage2 import Region, untouched_by_leaf_level

    base = 0x4000_0000
    mapped = Leaf(base, 4096, 3, base | 0x4C3 | (1 << 10), False)
    walk = Walk([mapped], [], [], spans=[(0, 1 << 39, 0), (0, 1 << 30, 1), (base, base + (1 << 30), 2),
                                         (base, base + (2 << 20), 3)])
    regions = [Region(base, 1 << 30)]
    assert walk.leaf_at(base + 100) is mapped and walk.leaf_at(base + 4096) is None
    found = untouched_by_leaf_level(walk, regions, base, base + (1 << 30))
    assert found == {3: base + 4096, 2: base + (2 << 20)}


def test_the_host_stage2_memattr_follows_version_and_fwb():
    from harness.model.stage2 import host_s2_memattr
    assert [host_s2_memattr(v, fwb) for v in ("6.12", "7.3") for fwb in (False, True)] == [0xF, 0xF, 0xF, 0x7]
