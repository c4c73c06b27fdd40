"""Tests for harness.model.buddy, the pKVM EL2 buddy allocator model.

Three kinds of evidence:
  * golden tests worked by hand from arch/arm64/kvm/hyp/nvhe/page_alloc.c (6.12
    line numbers; older versions as read in their patches, see harness/model/NOTES.md);
  * an invariant oracle (per-page ownership map) that knows nothing about how
    the allocator picks blocks, run on random legal operation sequences;
  * a literal transliteration of the C code (circular doubly linked lists, one
    dict per struct hyp_page, its own hand-written version table) run in
    lock-step with the model on random sequences, illegal operations included.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.model.buddy import BuddyBug, HypPool, version_rules

PG = 4096
BASE = 0x4000_0000            # 2 MiB-aligned (pfn 0x40000)

# One representative per rule set, and what each is called.
VERSIONS = ["5.13", "5.14", "5.15", "6.1", "6.2", "6.12", "6.14", "7.3"]
RULESET = {"5.13": "5.13", "5.14": "5.14", "5.15": "5.15", "6.1": "5.17+", "6.2": "6.2+",
           "6.12": "6.4+", "6.14": "6.14+", "7.3": "7.2+"}
NO_ORDER = {"5.13": 0xFFFF_FFFF, "5.14": 0xFFFF, "5.15": 0xFFFF, "6.1": 0xFFFF, "6.2": 0xFFFF,
            "6.12": 0xFFFF, "6.14": 0xFF, "7.3": 0xFF}
SPLIT_VERSIONS = [v for v in VERSIONS if v not in ("5.13", "5.14")]


def pg(i: int, base: int = BASE) -> int:
    return base + i * PG


def lists(pool: HypPool) -> dict[int, list[int]]:
    """free_lists() without the empty lists, for compact expected values."""
    return {k: v for k, v in pool.free_lists().items() if v}


# ------------------------------------------------------------------------------------------
# Independent hand transcription of each hyp_pool_init's max_order (not the model's code).


def expected_max_order(version: str, nr_pages: int) -> int:
    def get_order_of(nbytes: int) -> int:           # ceil(log2(ceil(bytes / 4K))); 0 bytes -> 52
        if nbytes == 0:
            return 52
        pages = -(-nbytes // PG)
        return (pages - 1).bit_length()

    if version in ("5.13", "5.14", "5.15"):       # min(MAX_ORDER=11, get_order(n << 12)), u32 shift
        return min(11, get_order_of((nr_pages * PG) % 2**32))
    if version in ("6.1", "6.2"):                 # min(MAX_ORDER=11, get_order((n + 1) << 12))
        return min(11, get_order_of(((nr_pages + 1) % 2**32 * PG) % 2**32))
    return min(10, get_order_of((nr_pages * PG) % 2**32))   # 6.4+: MAX_PAGE_ORDER=10, inclusive


def expected_top(version: str, nr_pages: int) -> int:
    """Highest order alloc can search and coalescing can build."""
    mo = expected_max_order(version, nr_pages)
    return mo if version in ("6.12", "6.14", "7.3") else mo - 1


# ------------------------------------------------------------------------------------------
# Golden tests, worked by hand.


def test_review_thread_buddy_examples():
    # page_alloc.c:27-31 / the RFC v2 review thread: 4-page pool, pages 0..3.
    pool = HypPool(BASE, 4)
    assert pool.buddy_of(pg(0), 0) == pg(1)
    assert pool.buddy_of(pg(0), 1) == pg(2)
    assert pool.buddy_of(pg(1), 0) == pg(0)
    assert pool.buddy_of(pg(2), 0) == pg(3)
    # Outside [range_start, range_end) -> NULL (:45-46).
    assert pool.buddy_of(pg(0), 2) is None
    odd = HypPool(BASE + PG, 4)             # pfns 0x40001..0x40004
    assert odd.buddy_of(pg(1), 0) is None   # 0x40000 is below range_start


def test_four_page_buddy_tree_6_12():
    # page_alloc.c:16-25. max_order = min(10, get_order(4 pages)) = 2, inclusive.
    # Init frees pages 0..3 ascending through __hyp_attach_page:
    #   p0: buddy p1 refcount 1          -> free[0] = [p0]
    #   p1: buddy p0 free, order 0       -> merge at p0, order 1; buddy p2 refcount 1 -> free[1] = [p0]
    #   p2: buddy p3 refcount 1          -> free[0] = [p2]
    #   p3: buddy p2 -> p2 order 1; buddy p0 order 1 -> p0 order 2; (2+1) <= 2 fails -> free[2] = [p0]
    pool = HypPool(BASE, 4, version="6.12")
    assert pool.max_order == 2 and pool.top_order == 2
    assert pool.free_lists() == {0: [], 1: [], 2: [pg(0)]}
    assert [pool.page(pg(i)) for i in range(4)] == [(0, 2), (0, 0xFFFF), (0, 0xFFFF), (0, 0xFFFF)]
    assert pool.range_start == BASE and pool.range_end == pg(4)


@pytest.mark.parametrize("version", ["5.13", "5.14", "5.15"])
def test_four_page_pool_exclusive_max_order_never_forms_top_block(version):
    # max_order = get_order(4 pages) = 2, exclusive: the loop runs while (order + 1) < 2, so the
    # last merge stops at order 1: p3 -> p2 order 1, and (1 + 1) < 2 fails -> free[1] = [p0, p2].
    pool = HypPool(BASE, 4, version=version)
    assert pool.max_order == 2 and pool.top_order == 1
    assert pool.free_lists() == {0: [], 1: [pg(0), pg(2)]}      # free_area[2] never initialised
    assert pool.alloc(2) is None                                # while (i < max_order ...)
    assert pool.page(pg(2)) == (0, 1)


def test_four_page_pool_after_max_order_fix():
    # 5.17..6.1: get_order((4 + 1) pages) = 3, exclusive -> top order 2: same tree as 6.12.
    pool = HypPool(BASE, 4, version="6.1")
    assert pool.max_order == 3 and pool.top_order == 2
    assert lists(pool) == {2: [pg(0)]}


def test_odd_first_pfn_keeps_first_page_alone():
    # pfns 0x40001..0x40004 (range_end pfn 0x40005). Buddies are absolute (:37-39):
    #   0x40001: buddy 0x40000 < range_start             -> free[0] = [0x40001]
    #   0x40002: buddy 0x40003 refcount 1                -> free[0] = [0x40001, 0x40002]
    #   0x40003: buddy 0x40002 -> order 1 at 0x40002; buddy 0x40000 out -> free[1] = [0x40002]
    #   0x40004: buddy 0x40005 >= range_end              -> free[0] = [0x40001, 0x40004]
    start = BASE + PG
    pool = HypPool(start, 4)
    assert pool.free_lists() == {0: [pg(1), pg(4)], 1: [pg(2)], 2: []}
    assert pool.page(pg(1)) == (0, 0)
    assert pool.alloc(2) is None
    assert pool.alloc(1) == pg(2)


def test_alloc_put_split_sequence_exact():
    # 8 pages at BASE, 6.12: max_order 3, init leaves free[3] = [b].
    b = BASE
    pool = HypPool(b, 8, version="6.12")
    assert lists(pool) == {3: [b]}
    # alloc(0): lists 0..2 empty, take free[3].next = b; split keeps the lower half and appends
    # the upper halves from the largest order down: b+4 -> free[2], b+2 -> free[1], b+1 -> free[0].
    a = pool.alloc(0)
    assert a == b
    assert lists(pool) == {0: [pg(1)], 1: [pg(2)], 2: [pg(4)]}
    assert pool.page(b) == (1, 0)
    c = pool.alloc(1)                      # free[1].next = b+2, no split needed
    assert c == pg(2) and lists(pool) == {0: [pg(1)], 2: [pg(4)]}
    d = pool.alloc(0)                      # free[0].next = b+1
    assert d == pg(1) and lists(pool) == {2: [pg(4)]}
    pool.put(a)                            # b: buddy b+1 refcount 1 -> free[0] = [b]
    assert lists(pool) == {0: [b], 2: [pg(4)]}
    e = pool.alloc(2)                      # free[2].next = b+4
    assert e == pg(4) and lists(pool) == {0: [b]}
    pool.split(c)                          # b+2 -> (1, 0); tail b+3 -> (1, 0)
    assert pool.page(pg(2)) == (1, 0) and pool.page(pg(3)) == (1, 0)
    pool.put(pg(3))                        # buddy b+2 refcount 1 -> appended: free[0] = [b, b+3]
    assert lists(pool) == {0: [b, pg(3)]}
    pool.put(d)                            # b+1: buddy b free order 0 -> merge to b order 1;
    assert lists(pool) == {0: [pg(3)], 1: [b]}      # buddy b+2 refcount 1 -> free[1] = [b]
    pool.put(pg(2))                        # b+2: +b+3 -> order 1 at b+2; +b (order 1) -> order 2 at b;
    assert lists(pool) == {2: [b]}         # buddy b+4 refcount 1 -> free[2] = [b]
    assert pool.page(pg(2)) == (0, 0xFFFF) and pool.page(pg(3)) == (0, 0xFFFF)
    pool.put(e)                            # b+4: + b (order 2) -> order 3 at b; (3+1) <= 3 fails
    assert lists(pool) == {3: [b]}
    assert pool.page(b) == (0, 3) and pool.page(pg(4)) == (0, 0xFFFF)


def test_list_order_is_fifo_not_ascending():
    # 4 pages, free[2] = [b]. alloc(0) -> b (free[1]=[b+2], free[0]=[b+1]); alloc(0) -> b+1;
    # alloc(0) -> split b+2: keeps b+2, appends b+3 to free[0]. put(b+1): buddy b refcount 1 ->
    # appended after b+3: free[0] = [b+3, b+1] (descending: list order is insertion order).
    pool = HypPool(BASE, 4)
    assert [pool.alloc(0) for _ in range(3)] == [pg(0), pg(1), pg(2)]
    pool.put(pg(1))
    assert pool.free_lists()[0] == [pg(3), pg(1)]
    assert pool.alloc(0) == pg(3)          # free_area[0].next: the oldest insertion


MAX_ORDER_TABLE = {
    # nr_pages: (5.13/5.14/5.15, 5.17..6.3, 6.4+)   worked from each hyp_pool_init by hand
    0: (11, 1, 10),            # get_order(0) == 52 (non-constant path); (0+1) pages -> 0... see below
    1: (0, 1, 0),
    2: (1, 2, 1),
    3: (2, 2, 2),
    4: (2, 3, 2),
    5: (3, 3, 3),
    8: (3, 4, 3),
    1000: (10, 10, 10),
    1023: (10, 10, 10),
    1024: (10, 11, 10),
    1025: (11, 11, 10),
    2048: (11, 11, 10),
    2**20 - 1: (11, 11, 10),   # (2**20 - 1 + 1) << 12 wraps to 0 -> 52 -> capped
    2**20: (11, 0, 10),        # n << 12 wraps to 0 -> 52; (n + 1) << 12 wraps to 4096 -> 0
    2**20 + 1: (0, 1, 0),      # n << 12 wraps to 4096 -> 0
}
MAX_ORDER_TABLE[0] = (11, 0, 10)   # (0 + 1) pages -> get_order(4096) == 0


@pytest.mark.parametrize("nr_pages", sorted(MAX_ORDER_TABLE))
@pytest.mark.parametrize("version", VERSIONS)
def test_max_order_per_version(version, nr_pages):
    col = 0 if version in ("5.13", "5.14", "5.15") else 1 if version in ("6.1", "6.2") else 2
    want = MAX_ORDER_TABLE[nr_pages][col]
    assert version_rules(version).max_order(nr_pages) == want
    assert expected_max_order(version, nr_pages) == want      # the oracle's own transcription


@pytest.mark.parametrize("k", range(1, 11))
def test_exactly_2k_pages_exclusive_5_13_never_forms_order_k(k):
    n = 1 << k
    old = HypPool(BASE, n, version="5.13")
    assert old.max_order == k and old.top_order == k - 1
    assert old.free_lists()[k - 1] == [BASE, BASE + (n // 2) * PG]
    assert old.alloc(k) is None
    new = HypPool(BASE, n, version="6.12")
    assert new.free_lists()[k] == [BASE] and new.alloc(k) == BASE


def test_reserved_pages():
    # 8 pages, 3 reserved (refcount 1, order 0 in 5.14+). Free 3..7 ascending:
    #   p3: buddy p2 refcount 1 -> free[0] = [p3];  p4: buddy p5 refcount 1 -> free[0] = [p3, p4]
    #   p5: + p4 -> order 1 at p4; buddy p6 refcount 1 -> free[1] = [p4]
    #   p6: buddy p7 refcount 1 -> free[0] = [p3, p6]
    #   p7: + p6 -> order 1 at p6; + p4 (order 1) -> order 2 at p4; buddy p0 order 0 != 2 -> free[2]
    for version in VERSIONS:
        pool = HypPool(BASE, 8, reserved_pages=3, version=version)
        assert lists(pool) == {0: [pg(3)], 2: [pg(4)]}, version
        reserved_rc = 0 if version == "5.13" else 1   # 5.13: memset 0, never refcounted
        assert [pool.page(pg(i)) for i in range(3)] == [(reserved_rc, 0)] * 3
    # Putting a reserved page: 6.12 frees it (refcount 1 -> 0), it merges with nothing (p3's
    # buddy p2 is reserved; p2's buddy p3 is free order 0 -> merge!).
    pool = HypPool(BASE, 8, reserved_pages=3, version="6.12")
    pool.put(pg(2))                        # p2 + p3 -> order 1 at p2; buddy p0 refcount 1
    assert lists(pool) == {1: [pg(2)], 2: [pg(4)]}
    # 5.13: hyp_page_ref_dec_and_test has no check: 0 - 1 wraps to UINT_MAX, no attach.
    old = HypPool(BASE, 8, reserved_pages=3, version="5.13")
    old.put(pg(2))
    assert old.page(pg(2)) == (0xFFFF_FFFF, 0) and lists(old) == {0: [pg(3)], 2: [pg(4)]}


def test_reserved_more_than_nr_pages():
    pool = HypPool(BASE, 4, reserved_pages=9)
    assert lists(pool) == {} and pool.alloc(0) is None
    assert all(pool.page(pg(i)) == (1, 0) for i in range(4))


def test_truncated_range_end_and_external_pages_6_12():
    # nr_pages = 2**20 + 1 (4 GiB + 4 KiB): `nr_pages << PAGE_SHIFT` is a 32-bit shift, so
    # range_end = start + 4096 and max_order = get_order(4096) = 0 (page_alloc.c:231-236).
    # Every page above range_end is 'external' (:103-104): inserted at its order, no coalescing.
    start, n = 1 << 32, 2**20 + 1
    pool = HypPool(start, n, reserved_pages=n - 4, version="6.12")
    assert pool.range_end == start + PG and pool.max_order == 0
    free = [pg(i, start) for i in range(n - 4, n)]
    assert pool.free_lists() == {0: free}
    assert pool.is_external(free[0]) and not pool.is_external(start)
    assert pool.alloc(1) is None
    assert pool.alloc(0) == free[0]
    pool.put(free[0])
    assert pool.free_lists() == {0: free[1:] + free[:1]}
    # 5.15: the same size gives max_order 0, exclusive: free_area[0] is never initialised.
    with pytest.raises(BuddyBug, match="never initialised"):
        HypPool(start, n, reserved_pages=n - 4, version="5.15")


@pytest.mark.parametrize("version,want", [
    # 6.2+: page 3 is above range_end -> `goto insert` (:103-104): no coalescing, order 0.
    ("6.12", {0: [pg(2, 1 << 32), pg(3, 1 << 32)]}),
    # 6.1: no such rule. max_order = get_order((n + 1) << 12 -> 4 pages) = 2, exclusive (top 1);
    # page 3's buddy, page 2, is inside the range and free: they merge into an order-1 block that
    # straddles range_end.
    ("6.1", {1: [pg(2, 1 << 32)]}),
])
def test_external_page_put_back_into_the_pool(version, want):
    # n = 2**20 + 3: range_end = start + 3 pages. Snapshot: page 2 free (listed at order 0),
    # everything else allocated; then hyp_put_page(page 3).
    start, n = 1 << 32, 2**20 + 3
    free_page = pg(2, start)
    pool = HypPool.from_state(start, n, lambda pa: (0, 0) if pa == free_page else (1, 0),
                              {0: [free_page]}, version=version)
    assert pool.range_end == pg(3, start) and pool.is_external(pg(3, start))
    pool.put(pg(3, start))
    assert lists(pool) == want


def test_exact_4gib_pool_6_12_everything_external():
    # 2**20 pages: n << 12 wraps to 0: range_end == range_start, get_order(0) == 52 -> max_order 10.
    start, n = 1 << 32, 2**20
    pool = HypPool(start, n, reserved_pages=n - 2, version="6.12")
    assert pool.range_end == start and pool.max_order == 10
    assert lists(pool) == {0: [pg(n - 2, start), pg(n - 1, start)]}   # two buddies, unmerged


# ------------------------------------------------------------------------------------------
# External pages admitted from outside the allocator (a VM pool's memcache pages, 6.14+).


def test_7_2_frees_an_external_page_at_order_0_whatever_its_stale_order():
    # 8 pages, all reserved: no free list holds anything. A memcache page far away arrives with
    # refcount 1 (guest_s2_zalloc_page) and a stale order 3; hyp_put_page frees it.
    ext = BASE + 0x10_0000
    pool = HypPool(BASE, 8, reserved_pages=8, version="7.3.4")
    pool.admit(ext, 1, 3)
    assert pool.page(ext) == (1, 3) and pool.is_tracked(ext) and pool.external_pages() == [ext]
    pool.put(ext)                          # 7.3 page_alloc.c:105-108: order = 0, no coalescing
    assert lists(pool) == {0: [ext]} and pool.page(ext) == (0, 0)
    assert pool.alloc(0) == ext and pool.page(ext) == (1, 0)


def test_6_14_frees_an_external_page_at_its_own_order():
    ext = BASE + 0x10_0000
    pool = HypPool(BASE, 8, reserved_pages=8, version="6.14")
    pool.admit(ext, 1, 3)
    pool.put(ext)                          # page_alloc.c:103-104, 126-127: goto insert at p->order
    assert lists(pool) == {3: [ext]} and pool.page(ext) == (0, 3)
    # hyp_alloc_pages(pool, 0) splits it: __find_buddy_nocheck(ext, 2) is outside the range: NULL.
    with pytest.raises(BuddyBug, match="NULL dereference"):
        pool.alloc(0)


def test_6_14_splitting_an_external_block_whose_buddy_is_in_the_range():
    # Pool [BASE + 8 pages, + 16), all allocated; the external page at BASE has a stale order 4.
    # Extracting order 3 from it finds its order-3 buddy, BASE + 8 pages, inside the range, sets
    # that page's order to 3 and lists it, allocated as it is (:145-147): the kernel's own result.
    start, ext = pg(8), BASE
    pool = HypPool(start, 16, reserved_pages=16, version="6.14")
    pool.admit(ext, 1, 4)
    pool.put(ext)
    assert lists(pool) == {4: [ext]}
    assert pool.alloc(3) == ext
    assert lists(pool) == {3: [start]} and pool.page(start) == (1, 3) and pool.page(ext) == (1, 3)
    lit = LitPool(KERNELS["6.14"], start // PG, 16, 16)      # the transliteration agrees
    lit.admit(ext // PG, 1, 4)
    lit.put_page(ext // PG)
    assert lit.alloc(3) == ext and lit.state() == (pool.free_lists(), pool.pages())


@pytest.mark.parametrize("version", ["6.12", "6.14", "7.3"])
def test_an_external_page_never_coalesces_with_its_free_in_range_buddy(version):
    # Pool of 3 pages from BASE + 1 page: at init p1 stays order 0 (its buddy BASE is outside the
    # range), p2 and p3 merge. BASE is external, its order-0 buddy is p1, free and order 0.
    pool = HypPool(pg(1), 3, version=version)
    assert lists(pool) == {0: [pg(1)], 1: [pg(2)]}
    pool.admit(BASE, 1, 0)
    pool.put(BASE)
    assert lists(pool) == {0: [pg(1), BASE], 1: [pg(2)]}    # tail insertion, nothing merged
    assert pool.page(BASE) == (0, 0) and pool.page(pg(1)) == (0, 0)
    # hyp_alloc_pages takes free_area[0].next: p1 first, then the external page.
    assert pool.alloc(0) == pg(1) and pool.alloc(0) == BASE and pool.page(BASE) == (1, 0)
    assert lists(pool) == {1: [pg(2)]}
    pool.put(pg(1))                        # an in-range page still merges as before: its buddy
    assert lists(pool) == {0: [pg(1)], 1: [pg(2)]}          # BASE is outside the range


def test_refcounts_of_an_external_page():
    ext = BASE + 0x10_0000
    pool = HypPool(BASE, 4, version="7.3")
    pool.admit(ext, 1, 0)
    pool.get(ext)
    pool.put(ext)
    assert pool.page(ext) == (1, 0) and lists(pool) == {2: [BASE]}
    pool.put(ext)
    assert lists(pool) == {0: [ext], 2: [BASE]} and pool.pages()[ext] == (0, 0)
    with pytest.raises(BuddyBug, match=r"BUG_ON\(!p->refcount\)"):
        pool.put(ext)


def test_hyp_split_page_on_an_external_page_follows_tails_by_address():
    ext = BASE + 0x10_0000
    pool = HypPool(BASE, 4, version="6.14")
    pool.admit(ext, 1, 1)
    with pytest.raises(BuddyBug, match="outside the pool's pages") as e:
        pool.split(ext)                    # its tail, the next physical page, is unknown
    assert f"{ext + PG:#x}" in str(e.value) and pool.page(ext) == (1, 1)
    pool.admit(ext + PG, 0, 0xFF)
    pool.split(ext)                        # :189-194: head order 0, tail order 0 refcount 1
    assert pool.page(ext) == (1, 0) and pool.page(ext + PG) == (1, 0)
    seven = HypPool(BASE, 4, version="7.3")
    seven.admit(ext, 1, 0)
    seven.split(ext)                       # order 0: no tails
    assert seven.page(ext) == (1, 0)


def test_admit_is_refused_where_the_kernel_has_no_external_pages_and_for_pool_pages():
    with pytest.raises(ValueError, match="no external pages"):
        HypPool(BASE, 4, version="6.1").admit(pg(8), 1, 0)        # 5.17+ rules
    pool = HypPool(BASE, 4, version="7.3")
    with pytest.raises(ValueError, match="is a page of the pool"):
        pool.admit(pg(3), 1, 0)
    pool.admit(pg(8), 1, 0)
    with pytest.raises(ValueError, match="already admitted"):
        pool.admit(pg(8), 1, 0)
    with pytest.raises(ValueError, match="does not fit"):
        pool.admit(pg(9), 1, 0x100)        # u8 order
    with pytest.raises(ValueError, match="not a page address"):
        pool.admit(pg(9) + 8, 1, 0)
    with pytest.raises(ValueError, match="nor an admitted external page"):
        pool.page(pg(9))
    assert not pool.is_tracked(pg(9)) and pool.is_tracked(pg(8)) and pool.is_tracked(pg(3))
    with pytest.raises(BuddyBug, match="must be admit"):
        pool.put(pg(9))


def test_from_state_admits_external_free_list_entries():
    # 7.3 pool of 4 pages: p0 allocated, p1 free (order 0), p2 free (order 1); a memcache page
    # listed on free_area[0] after p1, and a second one admitted and in use.
    ext, used = BASE + 0x10_0000, BASE + 0x20_0000
    pages = {pg(0): (1, 0), pg(1): (0, 0), pg(2): (0, 1), pg(3): (0, 0xFF), ext: (0, 0), used: (1, 0)}
    pool = HypPool.from_state(BASE, 4, pages, {0: [pg(1), ext], 2: [], 1: [pg(2)]}, version="7.3",
                              external=[used])
    assert pool.external_pages() == [used, ext] and pool.page(ext) == (0, 0)
    assert lists(pool) == {0: [pg(1), ext], 1: [pg(2)]} and pool.pages() == pages
    assert pool.alloc(0) == pg(1) and pool.alloc(0) == ext and pool.alloc(0) == pg(2)
    snap = pool.snapshot()
    clone = HypPool.from_state(**snap)
    assert (clone.pages(), clone.free_lists(), clone.external_pages()) == \
        (pool.pages(), pool.free_lists(), pool.external_pages())
    pool.put(used)
    clone.put(used)
    assert clone.free_lists() == pool.free_lists() == {0: [pg(3), used], 1: [], 2: []}


@pytest.mark.parametrize("version", VERSIONS)
def test_tail_pages_hold_hyp_no_order_of_the_version(version):
    # 2 pages. Pre-5.17 exclusive: max_order = get_order(2 pages) = 1, top order 0: no merge.
    # Otherwise p1 merges into p0 and holds HYP_NO_ORDER (UINT_MAX / USHRT_MAX / 0xff).
    pool = HypPool(BASE, 2, version=version)
    if version in ("5.13", "5.14", "5.15"):
        assert [pool.page(pg(0)), pool.page(pg(1))] == [(0, 0), (0, 0)]
    else:
        assert [pool.page(pg(0)), pool.page(pg(1))] == [(0, 1), (0, NO_ORDER[version])]
    assert version_rules(version).name == RULESET[version]


# ------------------------------------------------------------------------------------------
# version_rules


@pytest.mark.parametrize("version,name", [
    ("5.13", "5.13"), ("5.13.19", "5.13"), ("5.14", "5.14"), ("5.14.14", "5.14"),
    ("5.14.21", "5.15"), ("5.15", "5.15"), ("5.15.170", "5.15"), ("5.16", "5.15"),
    ("5.17", "5.17+"), ("6.1", "5.17+"), ("6.1.192", "5.17+"), ("6.2", "6.2+"), ("6.3", "6.2+"),
    ("6.4", "6.4+"), ("6.8", "6.4+"), ("6.12", "6.4+"), ("6.12.117", "6.4+"), ("v6.12.3", "6.4+"),
    ("6.13", "6.4+"), ("6.14", "6.14+"), ("6.17", "6.14+"), ("5.10", "5.13"), ("6.18", "6.14+"),
    ("7.0", "6.14+"), ("7.1.3", "6.14+"), ("7.2", "7.2+"), ("7.2.13", "7.2+"), ("7.3", "7.2+"),
    ("7.3.4", "7.2+"), ("7.4", "7.2+"),
])
def test_version_rules_selection(version, name):
    r = version_rules(version)
    assert r.name == name and r.requested == version


def test_version_rules_warnings_and_fields():
    assert version_rules("6.12").warning is None
    assert version_rules("6.1.192").warning is None
    for read in ("7.2", "7.2.13", "7.3", "7.3.4"):
        assert version_rules(read).warning is None
    for unread in ("6.18", "7.0"):
        assert "not read" in version_rules(unread).warning and "6.14+" in version_rules(unread).warning
    assert "newer" in version_rules("7.4").warning
    assert "did not exist" in version_rules("5.10").warning
    assert version_rules("5.14.21").warning
    r = version_rules("6.12")
    assert (r.inclusive, r.hyp_no_order, r.order_bits, r.external_pages) == (True, 0xFFFF, 16, True)
    assert "get_order(nr_pages << PAGE_SHIFT)" in r.max_order_formula
    r = version_rules("6.14")
    assert (r.hyp_no_order, r.order_bits, r.order_type) == (0xFF, 8, "u8")
    assert (r.external_order_zero, r.init_resets_order) == (False, False)
    r7 = version_rules("7.3.4")
    assert (r7.external_order_zero, r7.init_resets_order) == (True, True)
    same = ("max_order_formula", "inclusive", "hyp_no_order", "order_bits", "refcount_bits",
            "availability", "external_pages", "has_split", "dec_check", "helpers_file")
    assert [getattr(r7, f) for f in same] == [getattr(r, f) for f in same]
    assert not any(version_rules(v).external_order_zero or version_rules(v).init_resets_order
                   for v in ("5.13", "5.15", "6.1", "6.2", "6.12", "7.1"))
    r = version_rules("6.1")
    assert (r.inclusive, r.plus_one, r.external_pages) == (False, True, False)
    r = version_rules("5.13")
    assert (r.hyp_no_order, r.refcount_bits, r.has_split, r.dec_check) == (0xFFFF_FFFF, 32, False, None)
    with pytest.raises(ValueError):
        version_rules("banana")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.name = "x"                                   # frozen


# ------------------------------------------------------------------------------------------
# BuddyBug: each names the kernel check it stands for.


def test_double_free_6_12():
    pool = HypPool(BASE, 4)
    a = pool.alloc(0)
    pool.put(a)
    with pytest.raises(BuddyBug) as e:
        pool.put(a)
    assert e.value.check == "BUG_ON(!p->refcount)" and "hyp_page_ref_dec()" in str(e.value)


def test_double_free_names_dec_and_test_before_6_2():
    pool = HypPool(BASE, 4, version="6.1")
    with pytest.raises(BuddyBug, match=r"BUG_ON\(!p->refcount\).*hyp_page_ref_dec_and_test"):
        pool.put(pool.free_lists()[2][0])


def test_put_of_a_tail_page_is_a_refcount_bug():
    pool = HypPool(BASE, 4)
    a = pool.alloc(1)
    with pytest.raises(BuddyBug, match=r"BUG_ON\(!p->refcount\)"):
        pool.put(a + PG)


def test_5_14_0_put_of_refcount_zero_wraps():
    pool = HypPool(BASE, 4, version="5.14")
    a = pool.alloc(0)
    pool.put(a)
    pool.put(a)                            # no BUG_ON before 'Report corrupted refcount at EL2'
    assert pool.page(a)[0] == 0xFFFF


def test_get_past_ushrt_max():
    pool = HypPool(BASE, 4)
    a = pool.alloc(0)
    for _ in range(0xFFFF - 1):
        pool.get(a)
    assert pool.page(a) == (0xFFFF, 0)
    with pytest.raises(BuddyBug) as e:
        pool.get(a)
    assert e.value.check == "BUG_ON(p->refcount == USHRT_MAX)" and "hyp_page_ref_inc" in str(e.value)
    assert pool.page(a) == (0xFFFF, 0)     # checked before the increment


def test_5_13_get_wraps_silently():
    pages = {pg(i): (0, 0xFFFF_FFFF) for i in range(4)}
    pages[pg(0)] = (0xFFFF_FFFF, 2)
    pool = HypPool.from_state(BASE, 4, pages, {}, version="5.13")
    pool.get(pg(0))
    assert pool.page(pg(0)) == (0, 2)


def test_alloc_of_a_listed_page_with_refcount_from_corrupt_state():
    pool = HypPool(BASE, 4)
    snap = pool.snapshot()
    snap["pages"][BASE] = (1, 2)           # listed head claims a refcount
    bad = HypPool.from_state(BASE, 4, snap["pages"], snap["free_lists"])
    with pytest.raises(BuddyBug) as e:
        bad.alloc(0)
    assert e.value.check == "BUG_ON(p->refcount)"
    assert "hyp_set_page_refcounted" in str(e.value) and "hyp_alloc_pages" in str(e.value)
    # as in the kernel, the block was taken off its list and split first (:214-217)
    assert BASE not in [pa for blocks in bad.free_lists().values() for pa in blocks]


def test_alloc_after_get_on_a_free_page():
    # hyp_get_page() does not care that the page is free; hyp_alloc_pages then BUGs (:217).
    pool = HypPool(BASE, 4)
    pool.get(BASE)
    with pytest.raises(BuddyBug, match=r"BUG_ON\(p->refcount\)"):
        pool.alloc(0)
    old = HypPool(BASE, 4, version="5.13")
    old.get(BASE)
    with pytest.raises(BuddyBug, match=r"BUG\(\)"):
        old.alloc(0)


def test_put_of_a_free_page_after_get_corrupts_the_list():
    pool = HypPool(BASE, 4)
    pool.get(BASE)
    with pytest.raises(BuddyBug, match="list corruption"):
        pool.put(BASE)


def stale_state(version: str) -> HypPool:
    # 4 pages: p0 and p1 both listed on free_area[0]; p1 has refcount 1 (hyp_get_page() on a
    # free page); p2, p3 allocated.
    pages = {pg(0): (0, 0), pg(1): (1, 0), pg(2): (1, 0), pg(3): (1, 0)}
    return HypPool.from_state(BASE, 4, pages, {0: [pg(0), pg(1)]}, version=version)


def test_freeing_a_still_linked_page_5_13_leaves_a_stale_entry():
    # 5.13 keeps the node in struct hyp_page. put(p1): refcount 0 -> __hyp_attach_page: p1 order
    # HYP_NO_ORDER; buddy p0 is order 0 and linked -> merged (list_del_init(p0)), head p0 at
    # order 1; buddy p2 not linked -> free_area[1] = [p0]. p1's node is still on free_area[0].
    pool = stale_state("5.13")
    pool.put(pg(1))
    assert lists(pool) == {0: [pg(1)], 1: [pg(0)]}
    assert pool.page(pg(1)) == (0, 0xFFFF_FFFF)
    with pytest.raises(BuddyBug, match="undefined behaviour"):
        pool.alloc(0)                      # extracts p1 "of order UINT_MAX"


def test_freeing_a_still_linked_page_5_14_plus_wipes_its_node():
    # 5.14+: the node lives in the page, and :100 memsets the page before anything else.
    with pytest.raises(BuddyBug, match="zeroes the list node"):
        stale_state("6.12").put(pg(1))


def test_5_13_freeing_a_linked_page_that_stays_head_corrupts_the_list():
    # 4 pages, 5.13: free_area[1] = [p0, p2]. get(p0) -> refcount 1, still linked; put(p0) ->
    # refcount 0 -> attach at order 1 (top order, no merge) -> list_add_tail(&p0->node) while
    # p0->node is still on free_area[1].
    pool = HypPool(BASE, 4, version="5.13")
    pool.get(BASE)
    with pytest.raises(BuddyBug, match=r"list_add_tail of a node already on a free list"):
        pool.put(BASE)


def test_extract_into_a_linked_buddy_corrupts_the_list():
    # Corrupt snapshot: p0 heads an order-1 block on free_area[1], but its upper half p1 is also
    # linked, on free_area[2] (which alloc(0) reaches only after free_area[1]). alloc(0) takes
    # p0, splits it, and page_add_to_list(p1) (:147) re-adds a node that is still linked.
    pages = {pg(0): (0, 1), pg(1): (0, 2), pg(2): (1, 0), pg(3): (1, 0)}
    pool = HypPool.from_state(BASE, 4, pages, {1: [pg(0)], 2: [pg(1)]})
    with pytest.raises(BuddyBug, match="__hyp_extract_page"):
        pool.alloc(0)


def test_split_with_a_referenced_tail():
    pool = HypPool(BASE, 4)
    a = pool.alloc(1)
    pool.get(a + PG)                       # tail refcount 0 -> 1
    with pytest.raises(BuddyBug) as e:
        pool.split(a)
    assert e.value.check == "BUG_ON(p->refcount)" and "hyp_split_page" in str(e.value)
    assert pool.page(a) == (1, 1)          # nothing changed


def test_split_of_a_free_tail_is_undefined():
    pool = HypPool(BASE, 4)
    with pytest.raises(BuddyBug, match="undefined behaviour"):
        pool.split(pg(1))                  # order HYP_NO_ORDER: `1 << 65535`


def test_split_does_not_exist_before_5_15():
    for version in ("5.13", "5.14"):
        pool = HypPool(BASE, 4, version=version)
        with pytest.raises(NotImplementedError):
            pool.split(pool.alloc(0))


@pytest.mark.parametrize("op", ["put", "get", "split"])
def test_operations_outside_the_pool(op):
    pool = HypPool(BASE, 4)
    for pa in (BASE - PG, pg(4), 0, 1 << 40):
        with pytest.raises(BuddyBug, match="no kernel check") as e:
            getattr(pool, op)(pa)
        assert "outside the pool" in str(e.value)


@pytest.mark.parametrize("version", ["5.13", "5.14", "5.15"])
def test_one_page_pool_exclusive_versions_bug_at_init(version):
    # max_order = get_order(4096) = 0: hyp_pool_init initialises no list (i < 0), yet attaches
    # the page to free_area[0].
    with pytest.raises(BuddyBug, match=r"free_area\[0\] was never initialised"):
        HypPool(BASE, 1, version=version)
    pool = HypPool(BASE, 1, reserved_pages=1, version=version)   # nothing freed: fine
    assert pool.alloc(0) is None


def test_alloc_order_out_of_type_range():
    with pytest.raises(ValueError):
        HypPool(BASE, 4).alloc(-1)
    with pytest.raises(ValueError):
        HypPool(BASE, 4, version="6.14").alloc(256)
    assert HypPool(BASE, 4).alloc(11) is None


# ------------------------------------------------------------------------------------------
# Invariant oracle: per-page ownership, independent of how the allocator chooses blocks.


class Oracle:
    """Tracks which pages the test owns and checks the pool's published state."""

    def __init__(self, pool: HypPool, version: str, reserved: int) -> None:
        self.pool, self.version = pool, version
        self.n, self.start = pool.nr_pages, pool.range_start
        self.end = self.start + self.n * PG
        self.no = NO_ORDER[version]
        self.top = expected_top(version, self.n)
        self.owner: dict[int, object] = {pg(i, self.start): "R" for i in range(min(reserved, self.n))}
        self.reserved_rc = 0 if version == "5.13" else 1
        self.units: dict[int, list[int]] = {}    # head -> [order, refcount]

    def free_blocks(self) -> dict[int, int]:
        blocks: dict[int, int] = {}
        for k, heads in self.pool.free_lists().items():
            for h in heads:
                assert h not in blocks, "a block is listed twice"
                blocks[h] = k
        return blocks

    def alloc(self, k: int) -> None:
        before = self.free_blocks()
        free_pages = {h + i * PG for h, o in before.items() for i in range(1 << o)}
        possible = any(o >= k for o in before.values()) and k <= self.top
        pa = self.pool.alloc(k)
        if not possible:
            assert pa is None
            return
        assert pa is not None
        assert (pa // PG) % (1 << k) == 0, "not aligned to its size"
        assert self.start <= pa and pa + (PG << k) <= self.end, "outside the pool"
        for i in range(1 << k):
            page = pa + i * PG
            assert page not in self.owner, "overlaps a live block"
            assert page in free_pages, "was not free"
            self.owner[page] = pa
        self.units[pa] = [k, 1]

    def get(self, pa: int) -> None:
        self.pool.get(pa)
        self.units[pa][1] += 1

    def put(self, pa: int) -> None:
        self.pool.put(pa)
        u = self.units[pa]
        u[1] -= 1
        if not u[1]:
            for i in range(1 << u[0]):
                del self.owner[pa + i * PG]
            del self.units[pa]

    def split(self, pa: int) -> None:
        k, rc = self.units[pa]
        self.pool.split(pa)
        self.units[pa] = [0, rc]
        for i in range(1, 1 << k):
            self.units[pa + i * PG] = [0, 1]
            self.owner[pa + i * PG] = pa + i * PG

    def check(self) -> None:
        pages = self.pool.pages()
        blocks = self.free_blocks()
        seen: set[int] = set()
        for h, k in blocks.items():
            assert (h // PG) % (1 << k) == 0 and self.start <= h and h + (PG << k) <= self.end
            assert pages[h] == (0, k), "listed head must be (0, order)"
            for i in range(1 << k):
                page = h + i * PG
                assert page not in seen and page not in self.owner, "free block overlaps"
                seen.add(page)
                if i:
                    assert pages[page] == (0, self.no), "tail must be (0, HYP_NO_ORDER)"
        for h, k in blocks.items():        # maximally coalesced below the top order
            if k < self.top:
                assert blocks.get(h ^ (PG << k)) != k, "two free buddies left unmerged"
        assert len(seen) + len(self.owner) == self.n, "pages lost or double counted"
        for u, (k, rc) in self.units.items():
            assert pages[u] == (rc, k)
            for i in range(1, 1 << k):
                assert pages[u + i * PG] == (0, self.no)
        for page, who in self.owner.items():
            if who == "R":
                assert pages[page] == (self.reserved_rc, 0)


pool_params = st.tuples(
    st.one_of(st.integers(1, 48), st.integers(1, 2000)),            # nr_pages
    st.integers(0x40000, 0x40000 + 4099),                           # first pfn (unaligned)
    st.one_of(st.just(0), st.integers(0, 40)),                      # reserved pages
)
op_lists = st.lists(st.tuples(st.integers(0, 9), st.integers(0, 1 << 20)), min_size=20, max_size=100)
ORDER_CHOICES = [0, 0, 0, 0, 1, 1, 2, 3, 4, 5, 8, 10, 11]


def build(version: str, nr: int, pfn: int, reserved: int) -> HypPool | None:
    """A fresh pool, or None when hyp_pool_init itself would BUG (exclusive 1-page pools)."""
    mo = expected_max_order(version, nr)
    dead = mo == 0 and version in ("5.13", "5.14", "5.15") and reserved < nr
    if dead:
        with pytest.raises(BuddyBug, match="never initialised"):
            HypPool(pfn * PG, nr, reserved, version=version)
        return None
    return HypPool(pfn * PG, nr, reserved, version=version)


def run_legal_ops(oracle: Oracle, ops, can_split: bool, check_each: bool = True) -> None:
    for kind, r in ops:
        units = list(oracle.units)
        if kind <= 3 or not units:
            oracle.alloc(ORDER_CHOICES[r % len(ORDER_CHOICES)])
        elif kind <= 6:
            oracle.put(units[r % len(units)])
        elif kind == 7:
            oracle.get(units[r % len(units)])
        else:
            big = [u for u in units if oracle.units[u][0] > 0]
            if can_split and big:
                oracle.split(big[r % len(big)])
            else:
                oracle.put(units[r % len(units)])
        if check_each:
            oracle.check()
    oracle.check()


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=pool_params, ops=op_lists)
def test_random_legal_sequences_against_oracle(version, params, ops):
    nr, pfn, reserved = params
    reserved = min(reserved, nr)
    pool = build(version, nr, pfn, reserved)
    if pool is None:
        return
    assert pool.max_order == expected_max_order(version, nr)
    oracle = Oracle(pool, version, reserved)
    oracle.check()
    run_legal_ops(oracle, ops, version in SPLIT_VERSIONS, check_each=nr <= 600)


# ------------------------------------------------------------------------------------------
# Literal transliteration of the C, in lock-step with the model (illegal operations included).


@dataclass(frozen=True)
class Kernel:
    """Hand-written per-version facts for the transliteration (independent of the model's table)."""

    plus_one: bool        # get_order((nr_pages + 1) << PAGE_SHIFT)
    inclusive: bool       # <= max_order loops (6.4+)
    max_const: int        # MAX_ORDER / MAX_PAGE_ORDER
    no_order: int
    rc_bits: int
    list_avail: bool      # 5.13: !list_empty(&buddy->node) instead of !buddy->refcount
    external: bool        # goto insert for phys outside [range_start, range_end)
    dec_bug: bool
    has_split: bool
    node_in_page: bool    # 5.14+: node lives in the free page, zeroed on removal
    ext_order_zero: bool = False     # 7.2+: an external page is freed at order 0, uncoalesced
    init_resets_order: bool = False  # 7.2+: hyp_pool_init sets p[i].order = 0


KERNELS = {
    "5.13": Kernel(False, False, 11, 2**32 - 1, 32, True, False, False, False, False),
    "5.14": Kernel(False, False, 11, 2**16 - 1, 16, False, False, False, False, True),
    "5.15": Kernel(False, False, 11, 2**16 - 1, 16, False, False, True, True, True),
    "6.1": Kernel(True, False, 11, 2**16 - 1, 16, False, False, True, True, True),
    "6.2": Kernel(True, False, 11, 2**16 - 1, 16, False, True, True, True, True),
    "6.12": Kernel(False, True, 10, 2**16 - 1, 16, False, True, True, True, True),
    "6.14": Kernel(False, True, 10, 2**8 - 1, 16, False, True, True, True, True),
    "7.3": Kernel(False, True, 10, 2**8 - 1, 16, False, True, True, True, True, True, True),
}


class LitBug(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind   # "dec", "inc", "setrc", or "other"


class LitPool:
    """page_alloc.c, line by line, with struct list_head emulated as {key: [prev, next]}."""

    def __init__(self, kv: Kernel, pfn: int, nr_pages: int, reserved: int) -> None:
        self.kv = kv
        self.vm: dict[int, list[int]] = {}          # hyp_vmemmap: pfn -> [refcount, order]
        self.node: dict[object, list] = {}          # list nodes: ("H", k) heads, pa for pages
        phys = pfn * PG
        n = ((nr_pages + 1) if kv.plus_one else nr_pages) % 2**32
        nbytes = (n * PG) % 2**32
        go = 52 if nbytes == 0 else ((nbytes - 1) >> 12).bit_length()
        self.max_order = min(kv.max_const, go)
        for i in range(self.max_order + 1 if kv.inclusive else self.max_order):
            self.node[("H", i)] = [("H", i), ("H", i)]           # INIT_LIST_HEAD
        self.range_start = phys
        self.range_end = phys + (nr_pages * PG) % 2**32
        for i in range(nr_pages):
            self.vm[pfn + i] = [0, 0]    # a zeroed vmemmap; 7.2+ writes p[i].order = 0 anyway
            if not kv.node_in_page:
                self.node[(pfn + i) * PG] = [(pfn + i) * PG] * 2   # INIT_LIST_HEAD(&p[i].node)
        if kv.node_in_page:
            for i in range(nr_pages):
                self.set_refcounted(pfn + i)
            for i in range(reserved, nr_pages):
                self.put_page(pfn + i)
        else:
            for i in range(reserved, nr_pages):
                self.attach(pfn + i)

    # struct list_head
    def linked(self, key) -> bool:
        n = self.node.get(key)
        return n is not None and n[1] is not None and n[1] != key

    def list_add_tail(self, new, head) -> None:
        if head not in self.node or self.linked(new):
            raise LitBug("other")
        prev = self.node[head][0]
        self.node[new] = [prev, head]
        self.node[prev][1] = new
        self.node[head][0] = new

    def list_del(self, entry) -> None:
        if not self.linked(entry):
            raise LitBug("other")
        prev, nxt = self.node[entry]
        self.node[prev][1] = nxt
        self.node[nxt][0] = prev
        self.node[entry] = [None, None] if self.kv.node_in_page else [entry, entry]

    def walk(self, k: int) -> list[int]:
        out, cur = [], self.node[("H", k)][1]
        while cur != ("H", k):
            out.append(cur)
            cur = self.node[cur][1]
        return out

    # refcount helpers
    def set_refcounted(self, p: int) -> None:
        if self.vm[p][0]:
            raise LitBug("setrc")
        self.vm[p][0] = 1

    def put_page(self, p: int) -> None:
        page = self.vm.get(p)
        if page is None:
            raise LitBug("other")
        if page[0] == 0:
            if self.kv.dec_bug:
                raise LitBug("dec")
            page[0] = 2**self.kv.rc_bits - 1
            return
        page[0] -= 1
        if page[0] == 0:
            self.attach(p)

    def get_page(self, p: int) -> None:
        page = self.vm.get(p)
        if page is None:
            raise LitBug("other")
        if page[0] == 2**self.kv.rc_bits - 1:
            if self.kv.rc_bits == 16:
                raise LitBug("inc")
            page[0] = 0
            return
        page[0] += 1

    # page_alloc.c
    def nocheck(self, p: int, order: int):
        addr = (p * PG) ^ (PG << order)
        if addr < self.range_start or addr >= self.range_end:
            return None
        return addr // PG

    def avail(self, p: int, order: int):
        b = self.nocheck(p, order)
        if b is None or self.vm[b][1] != order:
            return None
        if self.kv.list_avail:
            return b if self.linked(b * PG) else None
        return None if self.vm[b][0] else b

    def can_grow(self, order: int) -> bool:
        return order + 1 <= self.max_order if self.kv.inclusive else order + 1 < self.max_order

    def admit(self, p: int, refcount: int, order: int) -> None:
        """A memcache page: hyp_vmemmap already holds its entry, guest_s2_zalloc_page set it."""
        self.vm[p] = [refcount, order]

    def attach(self, p: int) -> None:
        phys, order = p * PG, self.vm[p][1]
        external = self.kv.external and (phys < self.range_start or phys >= self.range_end)
        if external and self.kv.ext_order_zero:     # order = 0; coalesce = false
            order = 0
        if self.kv.node_in_page and order <= 10:    # memset(virt(p), 0, PAGE_SIZE << order)
            for i in range(1 << order):
                if self.linked((p + i) * PG):
                    raise LitBug("other")       # wipes a node its list neighbours point to
        if not external:
            self.vm[p][1] = self.kv.no_order
            while self.can_grow(order):
                b = self.avail(p, order)
                if b is None:
                    break
                self.list_del(b * PG)
                self.vm[b][1] = self.kv.no_order
                p = min(p, b)
                order += 1
        self.vm[p][1] = order
        self.list_add_tail(p * PG, ("H", order))

    def extract(self, p: int, order: int) -> int:
        self.list_del(p * PG)
        while self.vm[p][1] > order:
            if self.vm[p][1] > 64:
                raise LitBug("other")
            self.vm[p][1] -= 1
            b = self.nocheck(p, self.vm[p][1])
            if b is None:
                raise LitBug("other")
            self.vm[b][1] = self.vm[p][1]
            self.list_add_tail(b * PG, ("H", self.vm[b][1]))
        return p

    def alloc(self, order: int):
        i = order
        in_range = (lambda j: j <= self.max_order) if self.kv.inclusive else (lambda j: j < self.max_order)
        while in_range(i) and self.node[("H", i)][1] == ("H", i):
            i += 1
        if not in_range(i):
            return None
        p = self.extract(self.node[("H", i)][1] // PG, order)
        self.set_refcounted(p)
        return p * PG

    def split(self, p: int) -> None:
        order = self.vm[p][1]
        if order >= 31:
            raise LitBug("other")
        self.vm[p][1] = 0
        for i in range(1, 1 << order):
            tail = self.vm.get(p + i)
            if tail is None:
                raise LitBug("other")
            tail[1] = 0
            self.set_refcounted(p + i)

    def state(self) -> tuple[dict, dict]:
        nlists = self.max_order + 1 if self.kv.inclusive else self.max_order
        return ({k: self.walk(k) for k in range(nlists)},
                {pfn * PG: tuple(v) for pfn, v in self.vm.items()})


def bug_kind(pool: HypPool, e: BuddyBug) -> str:
    r = pool.rules
    if e.check == r.dec_check:
        return "dec"
    if e.check == r.inc_check:
        return "inc"
    if e.check == r.set_refcounted_check:
        return "setrc"
    return "other"


def lit_call(lit: LitPool, kind: str, arg):
    if kind == "alloc":
        return lit.alloc(arg)
    if kind == "admit":
        return lit.admit(arg[0] // PG, arg[1], arg[2])
    p = arg // PG
    if kind == "split":
        if p not in lit.vm:
            raise LitBug("other")
        return lit.split(p)
    return (lit.put_page if kind == "put" else lit.get_page)(p)


def held_pages(lit: LitPool) -> list[int]:
    return sorted(pfn * PG for pfn, (rc, _) in lit.vm.items() if rc)


def pick_address(pool: HypPool, held: list[int], r: int, wild: int) -> int:
    """A page we hold a reference to; with odds wild/64 any pool page, 1/64 one outside the pool."""
    sel = r % 64
    if sel < 63 - wild and held:
        return held[(r >> 6) % len(held)]
    if sel < 63 and pool.nr_pages:
        return pool.range_start + ((r >> 6) % pool.nr_pages) * PG
    return pool.range_start - PG if r & 1 else pool.span_end


def external_candidate(pool: HypPool, lit: LitPool, r: int, no_order: int) -> tuple[int, int, int] | None:
    """(pa, refcount, order) for an admit(): a page below, just above or far from the pool that
    neither holds yet; its order at times stale (as a memcache page's may be), refcount mostly 1."""
    where = (r >> 8) % 4
    if where == 0:
        pa = pool.range_start - (PG << ((r >> 10) % 6))         # aligned so a buddy may be in range
    elif where == 1:
        pa = pool.range_start - PG * (1 + (r >> 10) % 8)
    elif where == 2:
        pa = pool.span_end + PG * ((r >> 10) % 8)
    else:
        pa = (1 << 40) + PG * ((r >> 10) % 4)
    if pa < 0 or pa // PG in lit.vm:
        return None
    orders = [0, 0, 0, 0, 1, 2, 3, 5, 10, 11, no_order]
    return pa, (1, 1, 1, 1, 0, 2)[r % 6], orders[(r >> 3) % len(orders)]


def lockstep(version: str, nr: int, pfn: int, reserved: int, ops, wild: int) -> None:
    kv = KERNELS[version]
    try:
        lit = LitPool(kv, pfn, nr, reserved)
    except LitBug:
        with pytest.raises(BuddyBug):
            HypPool(pfn * PG, nr, reserved, version=version)
        return
    pool = HypPool(pfn * PG, nr, reserved, version=version)
    assert (pool.free_lists(), pool.pages()) == lit.state()
    for code, r in ops:
        kind = ("alloc", "alloc", "alloc", "put", "put", "put", "get", "split")[code % 8]
        if kind == "split" and not kv.has_split:
            kind = "put"
        held = held_pages(lit)
        if not held and r % 64 < 63 - wild:
            kind = "alloc"                  # nothing to put/get yet
        arg: object = (ORDER_CHOICES[r % len(ORDER_CHOICES)] if kind == "alloc"
                       else pick_address(pool, held, r, wild))
        if code >= 16 and kv.external:      # a page from the host's memcache (6.14+ VM pools)
            ext = external_candidate(pool, lit, r, kv.no_order)
            if ext is None:
                continue
            kind, arg = "admit", ext
            pool.admit(*ext)
            lit_call(lit, kind, ext)
            assert (pool.free_lists(), pool.pages()) == lit.state(), (kind, ext)
            continue
        try:
            want = lit_call(lit, kind, arg)
        except LitBug as e:
            with pytest.raises(BuddyBug) as got:
                getattr(pool, kind)(arg)
            assert bug_kind(pool, got.value) == e.kind, (kind, hex(arg), str(got.value))
            return                          # the hypervisor is dead: stop here
        assert getattr(pool, kind)(arg) == want, (kind, arg)
        assert (pool.free_lists(), pool.pages()) == lit.state(), (kind, arg)


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=90, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nr=st.one_of(st.integers(0, 20), st.integers(1, 300)), pfn=st.integers(0x40000, 0x40000 + 1030),
       reserved=st.one_of(st.just(0), st.integers(0, 12)),
       ops=st.lists(st.tuples(st.integers(0, 18), st.integers(0, 1 << 24)), min_size=40, max_size=160),
       wild=st.sampled_from([0, 0, 1, 4, 16]))
def test_lockstep_with_literal_transliteration(version, nr, pfn, reserved, ops, wild):
    lockstep(version, nr, pfn, min(reserved, nr + 1), ops, wild)


# ------------------------------------------------------------------------------------------
# from_state round trip.


@pytest.mark.parametrize("version", VERSIONS)
@settings(max_examples=20, deadline=None)
@given(params=pool_params, before=op_lists, after=op_lists, use_callable=st.booleans())
def test_from_state_round_trip(version, params, before, after, use_callable):
    nr, pfn, reserved = params
    reserved = min(reserved, nr)
    pool = build(version, nr, pfn, reserved)
    if pool is None:
        return
    oracle = Oracle(pool, version, reserved)
    can_split = version in SPLIT_VERSIONS
    run_legal_ops(oracle, before, can_split, check_each=False)
    snap = pool.snapshot()
    pages = snap["pages"].__getitem__ if use_callable else snap["pages"]
    clone = HypPool.from_state(snap["range_start"], snap["nr_pages"], pages, snap["free_lists"],
                               version=snap["version"], max_order=snap["max_order"])
    assert clone.pages() == pool.pages() and clone.free_lists() == pool.free_lists()
    assert (clone.max_order, clone.range_end) == (pool.max_order, pool.range_end)
    # Continue identical operations on both: the oracle drives `pool`, we mirror on `clone`.
    for kind, r in after:
        units = list(oracle.units)
        if kind <= 3 or not units:
            k = ORDER_CHOICES[r % len(ORDER_CHOICES)]
            assert clone.alloc(k) == oracle.pool.alloc(k)
            continue
        pa = units[r % len(units)]
        if kind == 8 and can_split and oracle.units[pa][0] > 0:
            clone.split(pa)
            oracle.split(pa)
        elif kind == 7:
            clone.get(pa)
            oracle.get(pa)
        else:
            clone.put(pa)
            oracle.put(pa)
        assert clone.free_lists() == pool.free_lists()
    # (allocs above bypass the oracle's bookkeeping, so compare states rather than re-check it)
    assert clone.pages() == pool.pages() and clone.free_lists() == pool.free_lists()


def test_from_state_rejects_what_it_cannot_represent():
    pool = HypPool(BASE, 8)
    snap = pool.snapshot()
    with pytest.raises(ValueError, match="not initialised"):
        HypPool.from_state(BASE, 8, snap["pages"], {5: [BASE]})
    with pytest.raises(ValueError, match="no \\(refcount, order\\) for external page"):
        HypPool.from_state(BASE, 8, snap["pages"], {0: [pg(8)]})      # 6.12: external, unknown
    with pytest.raises(ValueError, match="have no external pages"):
        HypPool.from_state(BASE, 8, HypPool(BASE, 8, version="6.1").pages(), {0: [pg(8)]}, version="6.1")
    with pytest.raises(ValueError, match="not a page address"):
        HypPool.from_state(BASE, 8, snap["pages"], {0: [BASE + 8]})
    with pytest.raises(ValueError, match="listed twice"):
        HypPool.from_state(BASE, 8, snap["pages"], {0: [BASE], 1: [BASE]})
    with pytest.raises(ValueError, match="no \\(refcount, order\\)"):
        HypPool.from_state(BASE, 8, {}, {})
    with pytest.raises(ValueError, match="does not fit"):
        HypPool.from_state(BASE, 8, lambda pa: (1 << 16, 0), {})


def test_from_state_observed_max_order_overrides_formula():
    pool = HypPool.from_state(BASE, 8, lambda pa: (1, 0), {}, version="6.12", max_order=1)
    assert pool.max_order == 1 and list(pool.free_lists()) == [0, 1]
    for i in range(8):
        pool.put(pg(i))
    assert lists(pool) == {1: [pg(0), pg(2), pg(4), pg(6)]}
