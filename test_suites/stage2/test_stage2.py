"""Stage-2 suite: what the host's touches and a VM's life do to the host stage-2 and the hyp
stage-1, against the model (harness.model.stage2) and the pKVM page-state rules."""

from __future__ import annotations

import pytest

from harness.model.invariants import run_checks
from harness.model.stage2 import Region, predict_from_tables, untouched_by_leaf_level
from harness.targets.guests import BackgroundGuests, guest_args, touch_phys

pytestmark = pytest.mark.needs_el2

PCIE_HIGH_MMIO = 0x80_0000_0000        # QEMU virt's 512 GiB high PCIe window: nothing maps it at boot


@pytest.mark.parametrize("level,size", [(1, "1 GiB"), (2, "2 MiB"), (3, "4 KiB")])
def test_a_host_touch_installs_the_leaves_the_model_predicts(target, payload, el2, level, size, harness_gap):
    before = el2.snapshot()
    regions = [Region(base, length) for base, length, _ in before.memblocks]
    version = el2.kernel.kernel_version
    # With FEAT_S2FWB (QEMU's max CPU) a 7.2+ host stage-2 leaf says MemAttr 0x7, "as stage 1".
    fwb_as_s1 = version.host_s2_memattr_as_s1 and any(lf.valid and lf.memattr == 0x7 for lf in before.host_s2.leaves)
    harness_gap(fwb_as_s1, "the stage-2 model predicts MemAttr 0xf, not stage 1's attributes under FWB (0x7)")
    if level == 1:
        addr = PCIE_HIGH_MMIO + 0x1000 * (1 + len(before.host_s2.leaves) % 16)
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
    assert all(lf.xn == want.xn and lf.memattr == want.memattr for lf in new), \
        "RAM maps executable, MMIO execute-never, both as normal memory (the host forces S2FWB off)"
    assert run_checks(after) == []


def test_the_carveout_and_the_hyp_image_are_hyp_owned(el2, harness_gap):
    harness_gap(el2.kernel.kernel_version.host_maps_hyp_text_read_only,
                "the hyp text is mapped read-only for the host; this test expects it unmapped")
    snap = el2.snapshot()
    text = (el2.kpa("__hyp_text_start"), el2.kpa("__hyp_text_end"))
    for lo, hi in (snap.carveout and (snap.carveout[0], snap.carveout[0] + snap.carveout[1]), text):
        for pa in range(lo, hi, 4096):
            leaf = snap.host_s2.leaf_at(pa)
            assert leaf is not None and not leaf.valid and leaf.owner == 1, \
                f"{pa:#x} in [{lo:#x}, {hi:#x}): {leaf.describe() if leaf else 'unmapped (host-owned)'}"


def test_a_live_vm_shares_its_kvm_and_donates_its_hyp_state(target, payload, el2, harness_gap):
    harness_gap(el2.kernel.kernel_version.host_page_state_in_vmemmap,
                "page states live in the hyp vmemmap, which the snapshot does not decode yet")
    absent = el2.snapshot().absent.get("vm_table")
    if absent:
        pytest.skip(f"no VM state at EL2 to check: {absent}")
    guests = BackgroundGuests(target, payload("pkvm_guest"), guest_args(vms=1, vcpus=2, pages=4, hold=3))
    guests.wait("ready")
    live = el2.snapshot()
    (vm,) = live.vms
    host_kvm_va = el2.mem.u64(vm.pa + el2.kernel.struct("pkvm_hyp_vm").offset("host_kvm"))
    host_kvm = el2.h2p(live, host_kvm_va)
    s2, s1 = live.host_s2.leaf_at(host_kvm), live.hyp_s1.leaf_at(host_kvm_va)
    assert s2 is not None and s2.valid and s2.state == "SHARED_OWNED", f"host struct kvm in host stage-2: {s2}"
    assert s1 is not None and s1.valid and s1.state == "SHARED_BORROWED", f"host struct kvm at EL2: {s1}"
    for what, pa in (("pkvm_hyp_vm", vm.pa), ("stage-2 PGD", vm.pgd_phys)):
        leaf = live.host_s2.leaf_at(pa)
        assert leaf is not None and not leaf.valid and leaf.owner == 1, f"donated {what} at {pa:#x}: {leaf}"
    guests.wait("done")
    after = el2.snapshot()
    for what, pa in (("struct kvm", host_kvm), ("pkvm_hyp_vm", vm.pa), ("stage-2 PGD", vm.pgd_phys)):
        leaf = after.host_s2.leaf_at(pa)
        assert leaf is None or (leaf.valid and leaf.state == "OWNED"), f"{what} at {pa:#x} after teardown: {leaf}"
    assert run_checks(after) == []
