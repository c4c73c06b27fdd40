"""A leak is named page by page: its use from the snapshot, and the traced call that allocated it."""

from __future__ import annotations

from types import SimpleNamespace

from harness.el2.pgtable import Walk
from harness.el2.trace import Op
from harness.model import leaks

PAGE = 4096


def test_a_leaked_page_is_named_with_its_use_and_the_call_that_allocated_it():
    before = SimpleNamespace(pages={0x1000: (1, 0), 0x2000: (0, 0), 0x3000: (0, 0)})
    after = SimpleNamespace(pages={0x1000: (1, 0), 0x2000: (1, 0), 0x3000: (2, 0)})
    pages = leaks.held(after) - leaks.held(before)
    assert pages == {0x2000, 0x3000}
    snap = SimpleNamespace(host_s2=Walk([], [], []), hyp_s1=Walk([], [(0x2000, 3)], []), vms=[])
    alloc = Op(41, 1, 0x9000, "alloc", {"order": 0}, 0x2000)
    lines = leaks.describe(pages, snap, {0x2000: alloc}, {0x9000: "hpool"})
    assert lines == ["0x2000: a hyp stage-1 table page (level 3); allocated by #41 on vCPU 1: "
                     "hyp_alloc_pages(hpool, order 0)",
                     "0x3000: use not known from the snapshot; no traced allocation returned it"]


def test_a_vms_pages_are_named_after_the_vm():
    vm = SimpleNamespace(handle=0x1000, index=0, pa=0x5000 + 0x40, pgd_phys=0x8000,
                         s2=Walk([], [(0x7000, 2)], []))
    uses = leaks.page_uses(SimpleNamespace(host_s2=None, hyp_s1=None, vms=[vm]))
    assert uses == {0x5000: "the pkvm_hyp_vm of VM 0x1000", 0x7000: "a stage-2 table page of VM 0x1000 (level 2)",
                    0x8000: "the stage-2 PGD of VM 0x1000"}
    assert leaks.describe([0x8000], SimpleNamespace(host_s2=None, hyp_s1=None, vms=[vm]), None) == \
        ["0x8000: the stage-2 PGD of VM 0x1000"]
