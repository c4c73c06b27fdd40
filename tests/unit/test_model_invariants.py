"""Each invariant fires on a corrupted state and stays quiet on a good one.

Good pool states come from the buddy model (harness.model.buddy); host stage-2 states are
built by hand with the decoder's own Leaf type, the PTE values written out in full."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.el2.image import MemoryImage
from harness.el2.pgtable import Leaf, Walk
from harness.el2.state import Pool, Snapshot, VmInfo
from harness.model.buddy import HypPool
from harness.model.invariants import CHECKS, evaluate, run_checks

PAGE = 4096
GOLDEN = Path(__file__).resolve().parents[1] / "golden"
RAM = 0x4000_0000
CARVE = 0x7F40_0000

MEM_RWX_4K = 0x400 | 0xC0 | (0xF << 2) | 0x3          # AF, S2AP RW, MemAttr 0xF, valid page
MEM_RWX_BLOCK = 0x400 | 0xC0 | (0xF << 2) | 0x1       # valid block
MMIO_RW_BLOCK = MEM_RWX_BLOCK | (1 << 54)             # XN
SHARED_OWNED = 1 << 55
HYP_TEXT_RX = 0x400 | 0x80 | 0x3                        # hyp stage-1 page: AF, AP[2] read-only, executable
HYP_DATA_RW = 0x400 | 0x3 | (1 << 54)                   # AF, writable, XN
SHARED_BORROWED_S1 = 2 << 55                            # software bits: PKVM_PAGE_SHARED_BORROWED


def model_pool(name: str, start: int, nr_pages: int, *, allocs: tuple[int, ...] = ()) -> tuple[Pool, list[int]]:
    m = HypPool(start, nr_pages, version="6.12")
    got = [m.alloc(order) for order in allocs]
    pool = Pool(name, 0, m.range_start, m.range_end, m.max_order, m.free_lists(), pages=m.pages(), dirty_free=[])
    return pool, got


def leaf(addr: int, size: int, level: int, pte: int) -> Leaf:
    return Leaf(addr, size, level, pte | (addr if pte & 1 else 0), lpa2=False)


def good_state() -> Snapshot:
    # sized as 6.12 sizes them for 1 GiB (pool-sizes): hyp_s1_pgtable_pages(), host_s2_pgtable_pages()
    hpool, h_alloc = model_pool("hpool", CARVE + 0x101000, 1032, allocs=(0, 0))
    s2pool, s_alloc = model_pool("host_s2_pool", CARVE + 0x600000, 1048, allocs=(0, 0, 0))
    vm_pool = Pool("vm4096", 0, RAM + 0x100000, RAM + 0x101000, 0, {0: []}, pages={RAM + 0x100000: (1, 0)},
                   dirty_free=[])
    snap = Snapshot("6.12.117", 0.0, 1.0, 1, 0, hyp_physvirt_offset=0, carveout=(CARVE, 0xC00000),
                    memblocks=[(RAM, 1 << 30, 0)],
                    pools={"hpool": hpool, "host_s2_pool": s2pool, "vm4096": vm_pool})
    snap.vms = [VmInfo(0, 0x1000, 0, 0, 1, RAM + 0x100000, vm_pool)]
    hyp_owned = [leaf(CARVE + i * PAGE, PAGE, 3, 0x4) for i in range(0xC00000 // PAGE)]
    snap.host_s2 = Walk([leaf(0, 1 << 30, 1, MMIO_RW_BLOCK),
                         leaf(RAM, 2 << 20, 2, MEM_RWX_BLOCK),
                         leaf(RAM + (2 << 20), PAGE, 3, MEM_RWX_4K | SHARED_OWNED),
                         leaf(RAM + 0x800000, PAGE, 3, 0x4), leaf(RAM + 0x900000, PAGE, 3, 0x4),   # hyp text, data
                         *hyp_owned], [(pa, 3) for pa in s_alloc], [])
    snap.hyp_text = (RAM + 0x800000, RAM + 0x801000)
    # the page the host shares is borrowed in the hyp's linear map (hyp VA == PA: physvirt offset 0)
    snap.hyp_s1 = Walk([leaf(RAM + (2 << 20), PAGE, 3, HYP_DATA_RW | SHARED_BORROWED_S1),
                        leaf(RAM + 0x800000, PAGE, 3, HYP_TEXT_RX), leaf(RAM + 0x900000, PAGE, 3, HYP_DATA_RW)],
                       [(pa, 3) for pa in h_alloc], [])
    return snap


def findings(snap, name):
    return [f for f in run_checks(snap) if f.check == name]


def test_the_good_state_is_quiet_for_every_check():
    assert run_checks(good_state()) == []


def _corrupt_pool_range(s):
    s.pools["hpool"].max_order = 9


def _corrupt_links(s):
    s.pools["host_s2_pool"].list_errors.append("free_area[0]: 0x7f541000.prev does not point back")


def _corrupt_block_shape(s):
    p = s.pools["hpool"]
    order = max(k for k, v in p.free_lists.items() if v)
    head = p.free_lists[order][0]
    p.pages[head + PAGE] = (0, 0)                     # a tail page that looks like a head


def _corrupt_coalescing(s):
    p = s.pools["hpool"]
    order = max(k for k, v in p.free_lists.items() if v)
    head = p.free_lists[order].pop(0)                 # split a free block into two listed halves
    half = PAGE << (order - 1)
    p.free_lists[order - 1] += [head, head + half]
    p.pages[head], p.pages[head + half] = (0, order - 1), (0, order - 1)


def _corrupt_accounting(s):
    p = s.pools["host_s2_pool"]
    order = max(k for k, v in p.free_lists.items() if v)
    p.free_lists[order].pop()                         # a free block lost from its list


def _corrupt_ownership(s):
    s.host_s2.tables.pop()                            # an allocated page no table refers to


def _corrupt_idmap(s):
    s.host_s2.leaves[1] = Leaf(RAM, 2 << 20, 2, MEM_RWX_BLOCK | (RAM + (4 << 20)), False)


def _corrupt_attributes(s):
    s.host_s2.leaves[0] = leaf(0, 1 << 30, 1, MEM_RWX_BLOCK)        # MMIO mapped executable


def _corrupt_invalid_leaves(s):
    s.host_s2.leaves.append(leaf(RAM + (4 << 20), 2 << 20, 2, 0x4))  # an owner annotation on a block


def _corrupt_page_states(s):
    s.host_s2.leaves[1] = leaf(RAM, 2 << 20, 2, MEM_RWX_BLOCK | SHARED_OWNED)  # shared block


def _corrupt_carveout(s):
    s.host_s2.leaves[7] = leaf(CARVE + 2 * PAGE, PAGE, 3, MEM_RWX_4K)   # the host maps hyp memory


def _corrupt_vm_table(s):
    s.vms[0].handle = 0x1001


# --- page states in the vmemmap and each VM's stage-2 at EL2 (6.14+): corrupted copies of a real
# 7.3 snapshot (tests/golden/el2-image-7.3: one live VM that touched 4 pages) ---

def live_73() -> Snapshot:
    return copy.deepcopy(_decoded_73())


@functools.cache
def _decoded_73() -> Snapshot:
    return MemoryImage.load(GOLDEN / "el2-image-7.3" / "image.el2img").decode()


def _with_state(s, want):
    return next(pa for pa, state in sorted(s.page_states.items()) if state == want)


def _corrupt_page_state_pairs(s):
    s.page_states[_with_state(s, (3, 0, 0))] = (3, 0b0100 ^ 3, 0)     # __hyp_state_comp bit 2 set


def _corrupt_page_state_host_s2(s):
    pa = _with_state(s, (3, 0, 0))
    s.host_s2.leaves.remove(s.host_s2.leaf_at(pa))                    # a hyp page left unannotated


def _corrupt_page_state_hyp_s1(s):
    s.page_states[_with_state(s, (3, 0, 0))] = (3, 3, 0)              # mapped at EL2, hyp NOPAGE


def _corrupt_guest_share_count(s):
    pa = _with_state(s, (1, 3, 1))
    s.page_states[pa] = (1, 3, 2)                                     # a share counted twice


def _corrupt_vm_s2_pages(s):
    leaf = next(leaf for leaf in s.vms[0].s2.leaves if leaf.valid)
    s.page_states.pop(leaf.pa)                                        # the guest maps a host-owned page
    s.page_states[leaf.pa + PAGE] = (1, 3, 1)                         # (keeps the share count whole)


PAGE_STATE_CORRUPTIONS = {
    "page-state-pairs": _corrupt_page_state_pairs, "page-state-host-s2": _corrupt_page_state_host_s2,
    "page-state-hyp-s1": _corrupt_page_state_hyp_s1, "guest-share-count": _corrupt_guest_share_count,
    "vm-s2-pages": _corrupt_vm_s2_pages,
}


def test_the_live_7_3_snapshot_is_quiet_and_has_what_the_checks_need():
    s = live_73()
    checked = evaluate(s)
    assert checked.findings == [] and set(PAGE_STATE_CORRUPTIONS) <= set(checked.ran)
    assert s.vms and s.vms[0].s2 and sum(1 for leaf in s.vms[0].s2.leaves if leaf.valid) == 4
    assert sum(count for _, _, count in s.page_states.values()) == 4


@pytest.mark.parametrize("name", sorted(PAGE_STATE_CORRUPTIONS))
def test_each_page_state_check_fires_on_its_corruption(name):
    s = live_73()
    PAGE_STATE_CORRUPTIONS[name](s)
    fired = findings(s, name)
    assert fired, f"{name} stayed quiet on a corrupted state"
    assert fired[0].expected != fired[0].seen and name in str(fired[0])


def test_page_state_checks_do_not_apply_before_6_14_and_fail_when_the_states_were_lost():
    old = good_state()
    old.absent["page_states"] = "Linux 6.12 keeps the host's page state in the host stage-2"
    assert set(PAGE_STATE_CORRUPTIONS) <= set(evaluate(old).not_applicable)
    lost = live_73()
    lost.page_states, lost.unavailable["page_states"] = None, "LookupError: vmemmap not mapped"
    fired = {f.check for f in run_checks(lost) if "could not be read" in f.seen}
    assert fired == set(PAGE_STATE_CORRUPTIONS) | {"hyp-s1-pages"}     # it reads the hyp's states there too


def test_a_guest_donation_is_checked_against_the_host_annotation():
    s = live_73()
    vm, leaf = s.vms[0], next(leaf for leaf in s.vms[0].s2.leaves if leaf.valid)
    donated = Leaf(leaf.addr, leaf.size, leaf.level, leaf.pte & ~(3 << 55), leaf.lpa2, leaf.typed)   # OWNED
    vm.s2.leaves[vm.s2.leaves.index(leaf)] = donated
    annotation = (2 << 60) | (2 << 1) | ((vm.handle | (leaf.addr // PAGE) << 16) << 4)
    s.host_s2.leaves.append(Leaf(leaf.pa, PAGE, 3, annotation, False, typed=True))
    s.host_s2.leaves.sort(key=lambda x: x.addr)
    s.page_states[leaf.pa] = (3, 3, 0)
    assert findings(s, "vm-s2-pages") == []
    s.host_s2.leaves[s.host_s2.leaves.index(s.host_s2.leaf_at(leaf.pa))] = Leaf(
        leaf.pa, PAGE, 3, annotation + (1 << 20), False, typed=True)          # donated to the next gfn
    assert [f.check for f in findings(s, "vm-s2-pages")] == ["vm-s2-pages"]


CORRUPTIONS = {
    "pool-range": _corrupt_pool_range, "free-list-links": _corrupt_links,
    "free-block-shape": _corrupt_block_shape, "maximal-coalescing": _corrupt_coalescing,
    "page-accounting": _corrupt_accounting, "pool-ownership": _corrupt_ownership,
    "s2-idmap": _corrupt_idmap, "s2-leaf-attributes": _corrupt_attributes,
    "s2-invalid-leaves": _corrupt_invalid_leaves, "s2-page-states": _corrupt_page_states,
    "carveout-hyp-owned": _corrupt_carveout, "vm-table": _corrupt_vm_table,
    "free-blocks-zero": lambda s: s.pools["hpool"].dirty_free.append((s.pools["hpool"].range_start, 0, 0x10)),
    "pool-sizes": lambda s: setattr(s.pools["host_s2_pool"], "range_end", s.pools["host_s2_pool"].range_end - PAGE),
    # the hyp keeps mapping a page the host took back (an unshare that left the hyp's mapping)
    "hyp-s1-pages": lambda s: s.host_s2.leaves.__setitem__(2, leaf(RAM + (2 << 20), PAGE, 3, MEM_RWX_4K)),
    "hyp-s1-permissions": lambda s: s.hyp_s1.leaves.__setitem__(
        2, leaf(RAM + 0x900000, PAGE, 3, HYP_DATA_RW & ~(1 << 54))),
}


@pytest.mark.parametrize("pte, seen", [(HYP_TEXT_RX & ~0x80, "writable and executable"),
                                       (HYP_DATA_RW & ~(1 << 54) | 0x80, "executable, mapping pages outside"),
                                       (HYP_DATA_RW, None)])
def test_hyp_stage1_permissions_follow_the_kernels_rules(pte, seen):
    s = copy.deepcopy(good_state())
    s.hyp_s1.leaves[2] = leaf(RAM + 0x900000 if seen != "writable and executable" else RAM + 0x800000, PAGE, 3, pte)
    fired = findings(s, "hyp-s1-permissions")
    assert (fired[0].seen.startswith(seen) if seen else fired == []), fired
    s.hyp_s1.leaves[2] = leaf(RAM + 0x800000, PAGE, 3, HYP_DATA_RW)       # the text, writable
    assert [f.seen for f in findings(s, "hyp-s1-permissions")] == ["writable"]


def test_every_carveout_page_is_checked_an_empty_entry_included():
    s = copy.deepcopy(good_state())
    gone = s.host_s2.leaf_at(CARVE + 0x5000)
    s.host_s2.leaves.remove(gone)                       # an annotation zeroed: the entry is empty
    (f,) = findings(s, "carveout-hyp-owned")
    assert f.where == f"carveout page {CARVE + 0x5000:#x}" and "empty host stage-2 entry" in f.seen
    s.host_s2 = None
    assert [f.seen for f in findings(s, "carveout-hyp-owned")] == ["the host stage-2 could not be read: None"]


def test_free_blocks_whose_contents_were_not_read_are_a_finding_not_a_pass():
    s = copy.deepcopy(good_state())
    s.pools["vm4096"].dirty_free = None
    (f,) = findings(s, "free-blocks-zero")
    assert "vm4096's free blocks could not be read" in f.seen


def test_every_check_has_a_corruption_test():
    assert set(CORRUPTIONS) | set(PAGE_STATE_CORRUPTIONS) == set(CHECKS)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_check_fires_on_its_corruption(name):
    s = copy.deepcopy(good_state())
    CORRUPTIONS[name](s)
    fired = findings(s, name)
    assert fired, f"{name} stayed quiet on a corrupted state"
    f = fired[0]
    assert f.where and f.expected and f.seen and f.expected != f.seen
    assert name in str(f)


def test_findings_are_precise():
    s = copy.deepcopy(good_state())
    _corrupt_vm_table(s)
    (f,) = findings(s, "vm-table")
    assert (f.where, f.expected, f.seen) == ("vm_table[0]", "handle 0x1000", "0x1001")


def test_version_changes_the_expected_max_order():
    s = good_state()
    assert findings(s, "pool-range") == []
    # 6.1's hyp_pool_init: get_order((nr_pages + 1) << PAGE_SHIFT): 64 pages -> 7, 1 page -> 1
    assert {f.where for f in run_checks(s, version="6.1", only=["pool-range"])} == {"hpool", "host_s2_pool", "vm4096"}


def test_duck_typed_states_work_too():
    pool = SimpleNamespace(range_start=0, range_end=PAGE, max_order=0, free_lists={0: [0]}, pages={0: (0, 0)},
                           list_errors=[], dirty_free=[])
    hyp_s1 = Walk([], [], [])
    duck = SimpleNamespace(pools={"p": pool}, host_s2=Walk([], [], []), kernel_version="6.12", carveout=(0, 0),
                           memblocks=[], vms=[], hyp_s1=hyp_s1, hyp_text=(0, 0), unavailable={},
                           hyp_physvirt_offset=0)
    # pool-sizes needs pKVM's own two pools and the memblocks: without them it says so (good_state covers it)
    assert {f.check for f in run_checks(duck)} == {"pool-sizes"}
    assert [f.seen for f in run_checks(duck, only=["pool-sizes"])] == ["the hyp memblocks could not be read: None"]
    # a part that could not be read is a finding in every check that needs it, never an empty pass
    duck.host_s2, duck.unavailable = None, {"host_s2": "OSError: QMP went away"}
    lost = "the host stage-2 could not be read: OSError: QMP went away"
    missing = {f.check for f in run_checks(duck) if f.seen == lost}
    assert missing == {"s2-idmap", "s2-leaf-attributes", "s2-invalid-leaves", "s2-page-states", "carveout-hyp-owned",
                       "hyp-s1-pages"}


def test_rules_follow_the_dwarf_shape_when_the_version_string_disagrees():
    from harness.model.invariants import choose_rules
    assert choose_rules("6.12.117", {"refcount_bits": 16, "order_bits": 16}).name == "6.4+"
    backport = choose_rules("6.12.117", {"refcount_bits": 16, "order_bits": 8})
    assert backport.name == "6.14+" and "shaped like 6.14+" in backport.warning
    odd = choose_rules("6.12", {"refcount_bits": 64, "order_bits": 64})
    assert odd.name == "6.4+" and "no known rule set" in odd.warning
    assert "warning" not in str(choose_rules("6.12", None).warning or "")


# --- the host stage-2 as 7.2+ encodes it (KernelVersion.typed_invalid_ptes, host_s2_memattr_as_s1,
# host_maps_hyp_text_read_only): the same invariants, read with that version's encodings ---

DONATION_TO_HYP = (2 << 60) | (1 << 1)               # type DONATION (63:60), owner hyp (3:1)
AS_S1_FWB = 0x7 << 2                                 # MT_S2_FWB_AS_S1
HYP_TEXT = (RAM + 0x700000, RAM + 0x710000)


def typed_leaf(addr: int, size: int, level: int, pte: int) -> Leaf:
    return Leaf(addr, size, level, pte | (addr if pte & 1 else 0), lpa2=False, typed=True)


def good_7x_state() -> Snapshot:
    snap = good_state()
    snap.kernel_version, snap.hyp_text = "7.3.4", HYP_TEXT
    fwb = ~(0xF << 2)
    text = [typed_leaf(a, PAGE, 3, (MEM_RWX_4K & fwb & ~0x80) | AS_S1_FWB | (1 << 54))       # R--, XN
            for a in range(*HYP_TEXT, PAGE)]
    snap.host_s2 = Walk([typed_leaf(0, 1 << 30, 1, (MMIO_RW_BLOCK & fwb) | AS_S1_FWB),
                         typed_leaf(RAM, 2 << 20, 2, (MEM_RWX_BLOCK & fwb) | AS_S1_FWB),
                         *text,
                         *[typed_leaf(CARVE + i * PAGE, PAGE, 3, DONATION_TO_HYP) for i in range(0xC00000 // PAGE)]],
                        snap.host_s2.tables, [])
    return snap


def test_a_typed_invalid_pte_names_its_type_and_owner():
    hyp = typed_leaf(CARVE, PAGE, 3, DONATION_TO_HYP)
    assert (hyp.invalid_type, hyp.owner, hyp.describe()) == ("DONATION", 1, "invalid DONATION owner=hyp")
    locked = typed_leaf(CARVE, PAGE, 3, 1 << 60)
    assert (locked.invalid_type, locked.owner) == ("LOCKED", None)
    assert leaf(CARVE, PAGE, 3, 0x4).owner == 1 and leaf(CARVE, PAGE, 3, 0x4).invalid_type is None   # 6.x layout


S2_CHECKS = ("s2-idmap", "s2-leaf-attributes", "s2-invalid-leaves", "s2-page-states", "carveout-hyp-owned")


def test_the_7x_host_stage2_is_quiet_and_each_7x_rule_still_bites():
    # (the pools are 6.12 model pools: only the host stage-2 checks are asked here)
    assert run_checks(good_7x_state(), only=S2_CHECKS) == []
    s = good_7x_state()                  # an invalid leaf that is LOCKED, not a donation
    s.host_s2.leaves[-1] = typed_leaf(s.host_s2.leaves[-1].addr, PAGE, 3, 1 << 60)
    assert [f.check for f in run_checks(s, only=S2_CHECKS)] == ["s2-invalid-leaves", "carveout-hyp-owned"]
    s = good_7x_state()                  # the hyp text writable by the host
    first_text = next(i for i, lf in enumerate(s.host_s2.leaves) if lf.addr == HYP_TEXT[0])
    s.host_s2.leaves[first_text] = typed_leaf(HYP_TEXT[0], PAGE, 3, (s.host_s2.leaves[first_text].pte | 0x80))
    assert [f.expected for f in findings(s, "s2-leaf-attributes")] == ["MemAttr 0x7, R-- (hyp text)"]
    s = good_7x_state()                  # one leaf with another MemAttr than the rest
    s.host_s2.leaves[1] = typed_leaf(RAM, 2 << 20, 2, MEM_RWX_BLOCK)
    assert len(findings(s, "s2-leaf-attributes")) == 1
    s = good_7x_state()                  # on 6.12 the same table is wrong everywhere it differs
    s.kernel_version = "6.12.117"
    assert findings(s, "s2-invalid-leaves") and findings(s, "s2-leaf-attributes")
