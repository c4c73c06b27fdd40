"""Stage-2 suite: what the host's touches and a VM's life do to the host stage-2 and the hyp
stage-1, against the model (harness.model.stage2) and the pKVM page-state rules."""

from __future__ import annotations

import pytest

from harness.model.invariants import render, run_checks
from harness.model.stage2 import (
    MEMATTR_FWB_AS_S1,
    HostAbortError,
    Region,
    host_s2_memattr,
    predict_from_tables,
    untouched_by_leaf_level,
)
from harness.targets.guests import BackgroundGuests, guest_args, guest_pages, touch_phys

pytestmark = pytest.mark.needs_el2

PAGE = 4096
PCIE_HIGH_MMIO = 0x80_0000_0000        # QEMU virt's 512 GiB high PCIe window: a NIC's BARs map its first GiB only


def _maps_at_level(addr: int, level: int, snap, regions, version) -> bool:
    try:
        return snap.host_s2.leaf_at(addr) is None and \
            predict_from_tables(addr, regions, snap.host_s2, version).leaf_level == level
    except HostAbortError:
        return False


@pytest.mark.parametrize("level,size", [(1, "1 GiB"), (2, "2 MiB"), (3, "4 KiB")])
def test_a_host_touch_installs_the_leaves_the_model_predicts(target, payload, el2, level, size):
    before = el2.snapshot()
    regions = [Region(base, length) for base, length, _ in before.memblocks]
    version = el2.kernel.kernel_version
    # Whether the CPU has FEAT_S2FWB (QEMU's max does, cortex-a72 not): 7.2+ host stage-2 leaves show it.
    fwb = any(lf.valid and lf.memattr == MEMATTR_FWB_AS_S1 for lf in before.host_s2.leaves)
    if level == 1:
        # a GiB of the window no earlier touch (nor, over SSH, the virtio NIC's BARs) has mapped
        addr = next((a for k in range(64) if _maps_at_level(a := PCIE_HIGH_MMIO + (k << 30) + 0x1000, 1, before,
                                                            regions, version)), 0)
        if not addr:
            pytest.skip("every GiB of the high PCIe window probed has a mapping already")
    else:
        found = {}
        for base, length in ((r.base, r.size) for r in regions):
            found.update({k: v for k, v in untouched_by_leaf_level(before.host_s2, regions, base, base + length,
                                                                    version).items() if k not in found})
        if level not in found:
            pytest.skip(f"no untouched RAM left that would map at level {level} ({size})")
        addr = found[level]
    want = predict_from_tables(addr, regions, before.host_s2, version)
    if before.host_s2.leaf_at(addr) is not None:
        pytest.skip(f"{addr:#x} is mapped already (an earlier test touched it)")
    assert touch_phys(target, payload("pkvm_guest"), [addr])[addr].startswith("value=")
    after = el2.snapshot()
    leaf = after.host_s2.leaf_at(addr)
    assert leaf is not None and leaf.valid, f"{addr:#x} not mapped after the host read it"
    assert leaf.level == want.leaf_level, (f"{addr:#x}: model level {want.leaf_level} ({want.size:#x} bytes at "
                                           f"{want.start:#x}), kernel level {leaf.level} ({leaf.size:#x} bytes at "
                                           f"{leaf.addr:#x}, {leaf.describe()})")
    new = [lf for lf in after.host_s2.leaves if want.start <= lf.addr < want.start + want.size]
    assert (min(lf.addr for lf in new), sum(lf.size for lf in new)) == (want.start, want.size)
    assert all(lf.valid and lf.pa == lf.addr and lf.state == "OWNED" for lf in new)
    memattr = host_s2_memattr(version, fwb)
    assert all(lf.xn == want.xn and lf.memattr == memattr for lf in new), \
        f"RAM maps executable, MMIO execute-never, both with MemAttr {memattr:#x}"
    assert (findings := run_checks(after)) == [], render(findings)


def test_the_host_stage2_is_the_models_at_every_ram_region_edge(target, payload, el2):
    """At the first and last page of every RAM region (with --ram-regions, several regions meet
    inside RAM): the entry there lies inside its region, and where the host has not touched the
    page yet, its access maps exactly what the model predicts, never across the edge."""
    snap = el2.snapshot()
    regions = [Region(base, length) for base, length, _ in snap.memblocks]
    version = el2.kernel.kernel_version
    print("RAM regions: " + ", ".join(f"[{r.base:#x}, {r.end:#x})" for r in regions))
    touched = []
    for addr in sorted({r.base for r in regions} | {r.end - PAGE for r in regions}):
        region = next(r for r in regions if r.base <= addr < r.end)
        leaf = el2.snapshot().host_s2.leaf_at(addr) if touched else snap.host_s2.leaf_at(addr)
        if leaf is None:               # never touched and not annotated: the host's to touch now
            want = predict_from_tables(addr, regions, el2.snapshot().host_s2, version)
            assert touch_phys(target, payload("pkvm_guest"), [addr])[addr].startswith("value=")
            leaf = el2.snapshot().host_s2.leaf_at(addr)
            assert leaf is not None and leaf.level == want.leaf_level and \
                want.start <= leaf.addr < want.start + want.size, \
                f"{addr:#x}: model {want}, kernel {leaf.describe() if leaf else 'nothing mapped'}"
            touched.append(addr)
        assert region.base <= leaf.addr and leaf.addr + leaf.size <= region.end, \
            f"the host stage-2 entry at {addr:#x} ({leaf.addr:#x}+{leaf.size:#x}) crosses its region's edge"
    print(f"edges touched now: {[hex(a) for a in touched]}")
    assert (findings := run_checks(el2.snapshot())) == [], render(findings)


def test_the_carveout_and_the_hyp_image_are_hyp_owned(el2):
    """Every page of the carveout and of the hyp's text is hyp-owned: annotated invalid in the host
    stage-2; from 7.2 the hyp text instead stays mapped for the host read-only and execute-never
    (to be inspected on a hyp panic), still hyp-owned in the vmemmap."""
    snap = el2.snapshot()
    text_read_only = el2.kernel.kernel_version.host_maps_hyp_text_read_only
    text = (el2.kpa("__hyp_text_start"), el2.kpa("__hyp_text_end"))
    for lo, hi in (snap.carveout and (snap.carveout[0], snap.carveout[0] + snap.carveout[1]), text):
        for pa in range(lo, hi, 4096):
            leaf = snap.host_s2.leaf_at(pa)
            where = f"{pa:#x} in [{lo:#x}, {hi:#x}): {leaf.describe() if leaf else 'unmapped (host-owned)'}"
            if text_read_only and text[0] <= pa < text[1]:
                assert leaf is not None and leaf.valid and leaf.readable and not leaf.writable and leaf.xn, where
            else:
                assert leaf is not None and not leaf.valid and leaf.owner == 1, where
            assert (snap.host_state(pa), snap.hyp_state(pa)) == ("NOPAGE", "OWNED"), where


def test_a_live_vm_shares_its_kvm_and_donates_its_hyp_state(target, payload, el2):
    """While a VM lives, the host's struct kvm is shared with the hyp (and pinned: mapped at EL2),
    its pkvm_hyp_vm and stage-2 PGD are donated; after teardown all three are the host's again.
    Page states from the vmemmap (6.14+) or the page tables' software bits (before)."""
    before = el2.snapshot()
    if "vm_table" in before.absent:
        pytest.skip(f"no VM state at EL2 to check: {before.absent['vm_table']}")
    guests = BackgroundGuests(target, payload("pkvm_guest"), guest_args(vms=1, vcpus=2, pages=4, hold=3))
    guests.wait("ready")
    live = el2.snapshot()
    new = live.vms_since(before)
    assert len(new) == 1, f"one new VM at EL2, saw {[hex(v.handle or 0) for v in new]} (before: {len(before.vms)})"
    vm = new[0]
    host_kvm_va = el2.mem.u64(vm.pa + el2.kernel.struct("pkvm_hyp_vm").offset("host_kvm"))
    host_kvm = el2.h2p(live, host_kvm_va)
    states = lambda snap, pa: (snap.host_state(pa), snap.hyp_state(pa))     # noqa: E731
    assert states(live, host_kvm) == ("SHARED_OWNED", "SHARED_BORROWED"), f"host struct kvm at {host_kvm:#x}"
    s1 = live.hyp_s1.leaf_at(host_kvm_va)
    assert s1 is not None and s1.valid, f"host struct kvm not mapped at EL2 while pinned: {s1}"
    for what, pa in (("pkvm_hyp_vm", vm.pa), ("stage-2 PGD", vm.pgd_phys)):
        leaf = live.host_s2.leaf_at(pa)
        assert states(live, pa) == ("NOPAGE", "OWNED"), f"donated {what} at {pa:#x}"
        assert leaf is not None and not leaf.valid and leaf.owner == 1, f"donated {what} at {pa:#x}: {leaf}"
    assert (findings := run_checks(live)) == [], render(findings)
    guests.wait("done")
    after = el2.snapshot()
    for what, pa in (("struct kvm", host_kvm), ("pkvm_hyp_vm", vm.pa), ("stage-2 PGD", vm.pgd_phys)):
        leaf = after.host_s2.leaf_at(pa)
        assert states(after, pa) == ("OWNED", "NOPAGE"), f"{what} at {pa:#x} after teardown"
        assert leaf is None or leaf.valid, f"{what} at {pa:#x} after teardown: {leaf}"
    assert (findings := run_checks(after)) == [], render(findings)


def _vm_s2_pages(vm) -> dict[int, int]:
    return {leaf.addr + off: leaf.pa + off for leaf in vm.s2.leaves if leaf.valid for off in range(0, leaf.size, PAGE)}


def test_each_vm_stage2_at_el2_maps_exactly_what_its_guest_touched(target, payload, el2):
    """6.14+: EL2 keeps each normal VM's stage-2. Two VMs touch chosen pages of two memslots;
    each VM's stage-2 at EL2 must map exactly those GPAs, each to the very host page the VMM's
    memory is (/proc/self/pagemap), shared by the host (SHARED_BORROWED in the guest, the host's
    page SHARED_OWNED with one guest share); after teardown every such page is the host's alone."""
    if not el2.kernel.kernel_version.el2_manages_guest_stage2:
        pytest.skip(f"Linux {el2.kernel.version}: EL2 keeps no stage-2 for normal VMs before 6.14")
    args = guest_args(vms=2, vcpus=1, pages=8, stride=3, slots=((0x8000_0000, 16, 5),), hold=3, pagemap=True)
    before = el2.snapshot()
    guests = BackgroundGuests(target, payload("pkvm_guest"), args)
    touched = guest_pages(guests.wait("ready"))
    live = el2.snapshot()
    new = live.vms_since(before)
    assert len(new) == 2 and all(vm.s2 is not None for vm in new), \
        f"two new VMs with a stage-2 at EL2, saw {[hex(v.handle or 0) for v in new]} (before: {len(before.vms)})"
    for index, vm in enumerate(new):
        want = touched[index]
        assert None not in want.values() and len(want) == 1 + 3 + 4, want
        mapped = _vm_s2_pages(vm)
        assert mapped == want, (f"VM {vm.handle:#x}: stage-2 at EL2 maps {sorted(map(hex, mapped))}, the guest "
                                f"touched {sorted(map(hex, want))}")
        for gpa, leaf in ((leaf.addr, leaf) for leaf in vm.s2.leaves if leaf.valid):
            assert leaf.state == "SHARED_BORROWED", f"VM {vm.handle:#x} GPA {gpa:#x}: {leaf.describe()}"
        for pa in want.values():
            assert live.page_state(pa)[0::2] == (1, 1), f"{pa:#x}: {live.page_state(pa)} (host SHARED_OWNED, 1 share)"
    assert (findings := run_checks(live)) == [], render(findings)
    guests.wait("done")
    after = el2.snapshot()
    for pa in (pa for pages in touched.values() for pa in pages.values()):
        assert (after.host_state(pa), after.page_state(pa)[2]) == ("OWNED", 0), f"{pa:#x} after teardown"
    assert (findings := run_checks(after)) == [], render(findings)
