"""The fault sweep's pure parts: what a torn-down workload left (harness.model.baseline), on real
EL2 snapshots decoded from recorded images; the kernel explanations of injected failures
(harness.model.error_paths); the sweep's table and plans; and the injector's call records."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest

from harness.el2.decode import NVHE
from harness.el2.image import MemoryImage
from harness.el2.inject import SITES, Call, Injection, Plan, sites_of
from harness.el2.state import VmInfo
from harness.model.baseline import leftovers
from harness.model.error_paths import explain
from harness.model.leaks import held
from harness.sweep import LEAKED, PANICKED, Row, SweepResult, Workload, plans_of

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
SERIES = sorted(p.name.removeprefix("el2-image-") for p in GOLDEN.glob("el2-image-*") if (p / "image.el2img").is_file())


@pytest.fixture(params=SERIES)
def snap(request):
    return MemoryImage.load(GOLDEN / f"el2-image-{request.param}" / "image.el2img").decode()


def test_a_snapshot_has_no_leftovers_against_itself(snap):
    assert leftovers(snap, snap) == []


def test_a_page_a_pool_kept_is_a_leftover_named_with_its_pool(snap):
    after = copy.deepcopy(snap)
    pool = after.pools["hpool"]
    free = next(pa for pa, (refcount, _) in pool.pages.items() if not refcount)
    pool.pages[free] = (1, 0)
    [left] = [x for x in leftovers(snap, after) if x.where == "hpool"]
    assert left.pages == [free] and f"{free:#x}" in str(left)


def test_host_stage2_tables_may_stay_in_their_pool_but_nothing_else(snap):
    after = copy.deepcopy(snap)
    pool = after.pools["host_s2_pool"]
    spare = sorted(pa for pa, (refcount, _) in pool.pages.items() if not refcount)[:2]
    for pa in spare:
        pool.pages[pa] = (1, 0)
    after.host_s2 = replace(snap.host_s2, tables=[*snap.host_s2.tables, (spare[0], 3)])
    [left] = [x for x in leftovers(snap, after) if x.where == "host_s2_pool"]
    assert left.pages == [spare[1]]


def test_a_vm_left_in_vm_table_is_a_leftover(snap):
    after = copy.deepcopy(snap)
    after.vms = [*snap.vms, VmInfo(7, 0x1007, 0, 0x4321_0000, 1, None, None)]
    [left] = [x for x in leftovers(snap, after) if x.where == "vm_table"]
    assert "vm_table[7]: VM 0x1007" in str(left)


def test_a_hyp_stage1_that_could_not_be_read_is_not_taken_for_clean(snap):
    after = copy.deepcopy(snap)
    after.hyp_s1 = None
    after.unavailable["hyp_s1"] = "a table page could not be read"
    [left] = [x for x in leftovers(snap, after) if x.where == "hyp stage-1"]
    assert "could not be compared" in str(left) and "a table page could not be read" in str(left)


def test_held_pages_are_those_with_a_reference(snap):
    pool = snap.pools["hpool"]
    assert held(pool) == {pa for pa, (r, _) in pool.pages.items() if r}


# --- explanations --------------------------------------------------------------------------------

BUG = ["[    2.5] kvm [75]: nVHE hyp BUG at: arch/arm64/kvm/hyp/nvhe/mem_protect.c:917!"]
POOL_LEFT = ["hpool: 1 page(s) left\n    0x7f51a000: a hyp stage-1 table page (level 3)",
             "page states: 2 page(s) left\n    0x417f1000: host OWNED / hyp NOPAGE -> host NOPAGE / hyp OWNED\n"
             "    0x417f2000: host OWNED / hyp NOPAGE -> host NOPAGE / hyp OWNED"]


def test_the_drain_of_a_torn_down_vms_pool_explains_its_leak_only():
    chain = ["reclaim_guest_pages", "__pkvm_teardown_vm"]
    assert "drain" in explain("hyp_alloc_pages", chain, LEAKED, POOL_LEFT)
    assert explain("hyp_alloc_pages", chain, PANICKED, BUG) is None
    assert explain("refill_memcache", chain, LEAKED, POOL_LEFT) is None
    # anything else left (a VM in vm_table, an hpool page that is not a hyp table) is a finding
    assert explain("hyp_alloc_pages", chain, LEAKED, [*POOL_LEFT, "vm_table: 1 page(s) left\n    x"]) is None
    not_a_table = ["hpool: 1 page(s) left\n    0x7f51a000: the pkvm_hyp_vm of VM"]
    assert explain("hyp_alloc_pages", chain, LEAKED, not_a_table) is None


def test_a_hyp_mapping_that_cannot_be_made_explains_the_el2_bug_it_panics_with():
    chain = ["hyp_zalloc_hyp_page", "hyp_map_walker", "pkvm_create_mappings_locked", "do_share.part.0"]
    assert "hpool is sized" in explain("hyp_alloc_pages", chain, PANICKED, BUG)
    assert explain("hyp_alloc_pages", chain, PANICKED, ["Unable to handle kernel paging request"]) is None


def test_the_unchecked_pgd_allocation_explains_a_hyp_panic_not_a_leak():
    chain = ["guest_s2_zalloc_pages_exact", "__kvm_pgtable_stage2_init", "__pkvm_init_vm"]
    panic = ["kvm [76]: nVHE hyp panic at: [<ffff8000804979ec>] __kvm_nvhe_hyp_get_page+0x78/0x78!"]
    assert "NULL check" in explain("hyp_alloc_pages", chain, PANICKED, panic)
    assert explain("hyp_alloc_pages", chain, LEAKED, POOL_LEFT) is None


# --- the sweep's records ----------------------------------------------------------------------------

def _call(seq: int, site: str, pool: str | None, nth: int, in_pool: int, failed: bool = False) -> Call:
    return Call(seq, site, pool, nth, in_pool, "hyp_zalloc_hyp_page+0x18", ["hyp_map_walker", "do_share"], 0, failed)


def test_the_sites_are_those_the_kernel_has():
    assert [s.name for s in sites_of({NVHE + "hyp_alloc_pages": 1})] == ["hyp_alloc_pages"]
    assert len(sites_of({NVHE + s.name: 1 for s in SITES})) == len(SITES)


def test_an_allocator_call_is_planned_by_its_number_within_its_pool():
    counted = Injection(None, [_call(1, "hyp_alloc_pages", "hpool", 1, 1), _call(2, "hyp_alloc_pages", "vm", 2, 1),
                               _call(3, "refill_memcache", None, 1, 1), _call(4, "hyp_alloc_pages", "vm", 3, 2)])
    assert plans_of(counted) == [Plan("hyp_alloc_pages", 1, "hpool"), Plan("hyp_alloc_pages", 1, "vm"),
                                 Plan("refill_memcache", 1, None), Plan("hyp_alloc_pages", 2, "vm")]
    assert plans_of(counted, limit=2) == plans_of(counted)[:2]
    assert counted.counts() == {"hyp_alloc_pages(hpool)": 1, "hyp_alloc_pages(vm)": 2, "refill_memcache": 1}


def test_a_call_knows_what_it_ran_under_and_says_where_it_came_from():
    c = _call(1, "hyp_alloc_pages", "hpool", 1, 1, failed=True)
    assert c.under("do_share") and c.under("hyp_zalloc_hyp_page") and not c.under("reclaim_guest_pages")
    assert str(c) == "hyp_alloc_pages call 1 in hpool from hyp_zalloc_hyp_page+0x18 < hyp_map_walker < do_share"
    assert Injection(Plan("hyp_alloc_pages", 1), [c]).fired is c


def test_the_table_counts_only_unexplained_findings():
    res = SweepResult(Workload("lifecycle (1 vCPU)", ("pkvm_guest",)), Injection(None))
    res.rows = [Row(Plan("hyp_alloc_pages", 1, "hpool"), "call", "", PANICKED, BUG, explained="by design"),
                Row(Plan("refill_memcache", 2), "call", "error=KVM_RUN: Cannot allocate memory", LEAKED,
                    ["page states: 1 page(s) left"])]
    assert [r.plan.site for r in res.findings] == ["refill_memcache"]
    table = res.table()
    assert "| hyp_alloc_pages | 1 | call |  | panicked (explained) |" in table
    assert "refill_memcache call 2: leaked" in table and "page states: 1 page(s) left" in table
