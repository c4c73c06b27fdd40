"""Allocator suite: drive the real EL2 buddy allocator through VM lifecycles and judge it with
the model's invariants, the pools' baselines and differential replay of every traced call.

What each check catches (see tests/mutants/ and `make test-mutants`):
- invariants (harness.model.invariants): broken free lists, missed coalescing, leaked pages,
  pages outside their pool, table pages not owned by their pool;
- baselines: a page not given back at VM teardown (hpool's free pages per order must return);
- replay: an allocation answer the buddy rules do not give (wrong list end, max_order), a
  refcount that slips (each get/put is checked against the kernel's hyp_page).
"""

from __future__ import annotations

import pytest

from harness.kernel.version import KernelVersion
from harness.model.invariants import CHECKS, evaluate, render, run_checks
from harness.model.sizing import stage2_pgd_pages
from harness.targets.guests import (
    BackgroundGuests,
    guest_args,
    guest_pages,
    random_workload,
    run_guests,
    touch_phys,
)
from harness.verdict import clean, scan

pytestmark = pytest.mark.needs_el2


def _replayed(box) -> None:
    r = box.result
    assert r.divergence is None, r.divergence.render()
    assert r.final_mismatches == [], "\n".join(r.final_mismatches[:10])


def _hpool_free(snap) -> dict[int, int]:
    return snap.pools["hpool"].free_per_order()


@pytest.fixture(scope="module")
def warmed(target, payload, el2):
    """One VM lifecycle first: the host's first VM leaves hyp structures that stay, so baselines
    are taken after it. What it left is returned: (snapshot before, snapshot after), for the test
    that explains each page."""
    before = el2.snapshot()
    run_guests(target, payload("pkvm_guest"), guest_args(vms=1, vcpus=2, pages=8))
    return before, el2.snapshot()


def test_what_the_first_vm_leaves_at_el2_is_hyp_stage1_tables(warmed, el2_leak):
    """The first VM's lasting allocations are explained, not absorbed into the baselines: every
    page hpool still holds after it is a table page of the hyp stage-1 (its mappings of the
    per-CPU and VM structures' VA ranges stay built), and no other pool keeps one."""
    before, after = warmed
    from harness.model.leaks import held, page_uses
    kept = held(after.pools["hpool"]) - held(before.pools["hpool"])
    uses = page_uses(after)
    unexplained = sorted(pa for pa in kept if not uses.get(pa, "").startswith("a hyp stage-1 table page"))
    assert unexplained == [], el2_leak(before, after, "hpool")
    assert held(after.pools["host_s2_pool"]) - held(before.pools["host_s2_pool"]) <= \
        {pa for pa, _ in after.host_s2.tables}, "host_s2_pool holds pages that are not host stage-2 tables"
    print(f"the first VM left {len(kept)} hyp stage-1 table page(s) in hpool")


def test_every_invariant_holds_after_boot(el2, harness_gap):
    snap = el2.snapshot()
    assert snap.unavailable == {}
    checked = evaluate(snap)
    print(checked.summary())                 # which rules, and each invariant that does not apply, and why
    assert set(checked.ran) | set(checked.not_applicable) == set(CHECKS)
    # a check does not apply only where this kernel lacks its input by design (Snapshot.absent)
    assert set(checked.not_applicable.values()) <= set(snap.absent.values())
    assert bool(checked.not_applicable) == bool(snap.absent)
    assert checked.findings == [], render(checked.findings)
    version = KernelVersion.of(snap.kernel_version)
    harness_gap(version.buddy_rules_warning is not None, f"no buddy rules read for {version} yet")
    assert checked.rules.name == version.buddy_rules and checked.rules.warning is None


@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_vm_lifecycles_return_every_pool_to_its_baseline(target, payload, el2, el2_trace, el2_leak, warmed, vcpus):
    before = el2.snapshot()
    with el2_trace() as box:
        for _ in range(2):
            run_guests(target, payload("pkvm_guest"), guest_args(vms=1, vcpus=vcpus, pages=16))
    after = el2.snapshot()
    _replayed(box)
    # two VMs: each had a pool at EL2 (6.2+), torn down with it; 6.1 has no per-VM pools
    vm_pools = 0 if "vm_table" in before.absent else 2
    assert box.result.per_pool.get("hpool") and len(box.result.dropped) == vm_pools
    findings = run_checks(after)
    assert findings == [], render(findings)
    assert after.vms == [] and set(after.pools) == {"hpool", "host_s2_pool"}
    assert _hpool_free(after) == _hpool_free(before), \
        "hpool pages not given back after the VMs were destroyed: " + el2_leak(before, after, "hpool")


def test_every_page_state_transition_of_a_vm_lifecycle_is_the_models(target, payload, el2, el2_transitions, warmed):
    """Each share, unshare, donation and pin a VM's life makes (traced by el2trace) returns what the
    model predicts and leaves its pages as predicted, and what was donated for the VM comes back."""
    checker, findings = el2_transitions()
    assert findings == [], "\n".join(findings)
    counts, settled = dict(checker.by_name), checker.settled
    run_guests(target, payload("pkvm_guest"), guest_args(vms=1, vcpus=2, pages=16))
    checker, findings = el2_transitions()
    assert findings == [], "\n".join(findings)
    made = {name: n - counts.get(name, 0) for name, n in checker.by_name.items()}
    print(f"transitions during one VM lifecycle: {made}")
    if "vm_table" in el2.snapshot().absent:           # 6.1: no VMs at EL2, the host shares its structures
        assert made.get("__pkvm_host_share_hyp", 0) >= 1 and made.get("__pkvm_host_unshare_hyp", 0) >= 1
        return
    # the VM's and both vCPUs' structures donated and given back, the host's pinned while in use
    assert made.get("__pkvm_host_donate_hyp", 0) >= 3 and made.get("__pkvm_hyp_donate_host", 0) >= 3
    assert made.get("hyp_pin_shared_mem", 0) >= 3 and made.get("hyp_unpin_shared_mem", 0) >= 3
    assert checker.settled == settled + 1, "the VM's teardown was not seen settling what was donated for it"


def test_many_vms_alive_at_once_press_hpool(target, payload, el2, el2_leak, warmed):
    before = el2.snapshot()
    guests = BackgroundGuests(target, payload("pkvm_guest"), guest_args(vms=12, vcpus=1, pages=4, hold=4))
    guests.wait("ready")
    live = el2.snapshot()
    if "vm_table" not in live.absent:          # 6.1 does not track VMs at EL2
        # each VM as asked: one vCPU, and a pool of exactly its stage-2 PGD; under pKVM every VM
        # gets kvm_ipa_limit bits of IPA whatever it asks (kvm_init_stage2_mmu), the host
        # stage-2's own size (QEMU's max with LPA2: 52 bits, a 16-page PGD)
        assert len(live.vms) == 12 and all(vm.pool is not None for vm in live.vms)
        assert [vm.nr_vcpus for vm in live.vms] == [1] * 12
        ipa_bits = live.host_s2_root[1]
        assert {vm.pool.nr_pages for vm in live.vms} == {stage2_pgd_pages(ipa_bits)}, f"IPA {ipa_bits} bits"
    assert live.pools["hpool"].free_pages < before.pools["hpool"].free_pages      # hyp stage-1 grew
    findings = run_checks(live)
    assert findings == [], render(findings)
    guests.wait("done")
    after = el2.snapshot()
    findings = run_checks(after)
    assert findings == [], render(findings)
    assert after.vms == []
    assert _hpool_free(after) == _hpool_free(before), \
        "hpool free pages per order not back to the baseline: " + el2_leak(before, after, "hpool")


def test_a_randomized_workload_replays_exactly(target, payload, el2, el2_trace, warmed, seed):
    """VM counts, vCPU counts, memslot layouts and touched pages drawn from `seed`; replay with --pkvm-seed."""
    steps = random_workload(seed)
    before = el2.snapshot()
    with el2_trace() as box:
        for args in steps:
            run_guests(target, payload("pkvm_guest"), args)
    print("steps: " + " | ".join(steps))
    _replayed(box)
    after = el2.snapshot()
    findings = run_checks(after)
    assert findings == [], f"seed {seed}: " + render(findings)
    assert after.vms == [] and _hpool_free(after) == _hpool_free(before), f"seed {seed}"


def test_a_protected_vm_lifecycle_returns_pools_and_page_states_to_their_baselines(target, payload, el2, warmed):
    """7.2+: a protected VM (KVM_VM_TYPE_ARM_PROTECTED) runs and touches every other page of its
    memory. Each such page is donated to it: the host can no longer read it (pkvm_guest checks),
    the VM's stage-2 at EL2 maps it OWNED, the host stage-2 annotates it with the VM's handle and
    gfn, the host's state is NOPAGE. After destroy every page is reclaimed: pools, page states
    and guest share counts are back at their baselines, exactly."""
    if not el2.kernel.kernel_version.has_protected_vm_type:
        pytest.skip(f"Linux {el2.kernel.version} has no KVM_VM_TYPE_ARM_PROTECTED")
    before = el2.snapshot()
    args = guest_args(vms=1, vcpus=1, pages=8, stride=2, hold=3, protected=True, pagemap=True)
    guests = BackgroundGuests(target, payload("pkvm_guest"), args)
    out = guests.wait("ready")
    assert "vm=0 slot=0 isolated=4 expected=4" in out, out
    touched = guest_pages(out)[0]
    live = el2.snapshot()
    new = live.vms_since(before)
    assert len(new) == 1, f"one new VM at EL2, saw {[hex(v.handle or 0) for v in new]} (before: {len(before.vms)})"
    vm = new[0]
    donated = {leaf.addr + off: (leaf.pa + off, leaf.state) for leaf in vm.s2.leaves if leaf.valid
               for off in range(0, leaf.size, 4096)}
    findings = run_checks(live)
    assert findings == [], render(findings)
    assert set(donated) == set(touched), f"the protected VM's stage-2 maps {sorted(map(hex, donated))}"
    for gpa, (pa, state) in donated.items():
        annotation = live.host_s2.leaf_at(pa)
        assert state == "OWNED" and live.host_state(pa) == "NOPAGE", f"GPA {gpa:#x} -> {pa:#x}: {state}"
        assert annotation is not None and annotation.donated_to == (vm.handle, gpa // 4096), \
            f"{pa:#x} in the host stage-2: {annotation.describe() if annotation else 'empty'}"
    guests.wait("done")
    after = el2.snapshot()
    findings = run_checks(after)
    assert findings == [], render(findings)
    assert after.vms == [] and _hpool_free(after) == _hpool_free(before)
    changed = {pa: (before.page_state(pa), after.page_state(pa))
               for pa in set(before.page_states or {}) | set(after.page_states or {})
               if before.page_state(pa) != after.page_state(pa)}
    assert changed == {}, f"page states not back at the baseline: {dict(list(changed.items())[:8])}"


REGION = 1 << 39           # one level-0 entry of the host stage-2: 512 GiB


def test_host_s2_pool_pressure_is_relieved_by_unmapping_mmio(target, payload, el2):
    """Touch MMIO in many empty 512 GiB regions (each costs host_s2_pool one table page: 6.12
    maps the whole region as 512 1 GiB blocks) until the pool runs dry. The next fault must make
    EL2 call host_stage2_unmap_dev_all(): every MMIO mapping goes and its tables return to the
    pool, which rises again; no hyp panic, and every invariant holds."""
    before = el2.snapshot()
    free0 = before.pools["host_s2_pool"].free_pages
    first = 2                                          # regions 0 (RAM, low MMIO) and 1 (PCIe) are in use
    ia_bits = before.host_s2_root[1]                   # min(the CPU's PARange, the kernel's PA bits)
    reachable = (1 << ia_bits) // REGION - first
    if reachable < free0 + 64:
        pytest.skip(f"the host stage-2 covers {ia_bits} bits: {reachable} empty 512 GiB regions, fewer than "
                    f"host_s2_pool's {free0} free pages (it needs a 52-bit host stage-2: LPA2, in Linux 6.9+ with "
                    "CONFIG_ARM64_PA_BITS_52, on -cpu max)")
    batch, seen, region = 64, [free0], first
    while region < first + free0 + 2 * batch:
        got = touch_phys(target, payload("pkvm_guest"), ranges=[(region * REGION, batch, REGION)])
        assert len(got) == batch, "the payload did not report every address"
        region += batch
        seen.append(el2.snapshot().pools["host_s2_pool"].free_pages)
        if seen[-1] > seen[-2]:
            break
    print(f"host_s2_pool free pages after each batch of {batch} regions:", seen)
    assert min(seen) < free0 // 4, f"the pool never ran low: {seen}"
    assert seen[-1] > seen[-2], f"the pool never rose again (no host_stage2_unmap_dev_all reclaim): {seen}"
    after = el2.snapshot()
    mapped = {leaf.addr // REGION for leaf in after.host_s2.leaves if leaf.valid and leaf.addr >= first * REGION}
    assert len(mapped) < region - first, f"all {region - first} regions still mapped: nothing was reclaimed"
    events = scan(clean(target.dmesg()))
    assert events == [], [e.line for e in events]
    findings = run_checks(after)
    assert findings == [], render(findings)


def test_each_el2_allocation_of_a_lifecycle_is_counted_with_its_pool_and_callers(target, payload, el2, el2_inject,
                                                                                  warmed):
    """The fault injector's counting (harness.el2.inject), under el2trace: every allocator call
    names its pool and its callers, and a VM's pool is drained under its teardown hypercall."""
    from harness.model.transitions import VM_INIT, VM_TEARDOWN

    with el2_inject() as box:
        run_guests(target, payload("pkvm_guest"), guest_args(vms=1, vcpus=1, pages=16))
    calls = box.result.calls
    assert calls and box.result.fired is None
    assert all(c.pool for c in calls if c.site == "hyp_alloc_pages")
    if VM_INIT in el2.kernel.hypercalls.values():            # 6.2+: EL2 keeps a pool per VM
        vm = [c for c in calls if c.pool == "vm"]
        assert any(c.under(f"handle_{t}") for c in vm for t in VM_TEARDOWN), [str(c) for c in vm]


def test_a_vcpu_memcache_refill_that_fails_reaches_the_host_and_it_goes_on(target, payload, el2_inject, warmed,
                                                                           kernel_version):
    """A failed top-up of a vCPU's memcache at EL2 (-ENOMEM) must come back to the host as an
    error, change nothing, and leave the host able to run the next VM."""
    if not kernel_version.refills_vcpu_memcache_for_normal_vms:
        pytest.skip(f"Linux {kernel_version} tops up no vCPU memcache at EL2 for a normal VM")
    guest = f"{payload('pkvm_guest')} {guest_args(vms=1, vcpus=1, pages=16)}"
    with el2_inject("refill_memcache", 1) as box:
        failed = target.run(guest, timeout=300)
    assert box.result.fired is not None, "the VM's lifecycle made no memcache refill at EL2"
    assert not failed.ok and "Cannot allocate memory" in failed.stdout + failed.stderr, failed.stdout
    run_guests(target, payload("pkvm_guest"), guest_args(vms=1, vcpus=1, pages=16))
