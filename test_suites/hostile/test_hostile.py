"""Hostile-host suite: host hypercalls a correct host never makes, each refused with the error the
model predicts (harness.model.hostile.predict) and changing nothing at EL2 (the snapshot before
and after compared by harness.model.baseline; with el2trace the transition oracle judges each
call too), and a seeded random mix of shares, unshares and VM lifecycles judged after every step.

What the refusals catch (tests/mutants/): a share that skips the host's state check, which only
a share of memory the host does not own (MMIO) shows."""

from __future__ import annotations

import pytest

from harness.hostile import run_mix, shortest
from harness.image.payloads import GUEST_DIR
from harness.kernel.version import KernelVersion
from harness.model.baseline import leftovers
from harness.model.errnos import EINVAL, EPERM, errno_name
from harness.model.hostile import BAD_HANDLE, INIT_VCPU_BAD_HANDLE, INIT_VCPU_NOT_DONATED, mix, predict
from harness.model.transitions import snapshot_states
from harness.targets.guests import BackgroundGuests, guest_args
from harness.targets.hostile import SMCCC_RET_NOT_SUPPORTED

SHARE, UNSHARE = "__pkvm_host_share_hyp", "__pkvm_host_unshare_hyp"
UART = 0x0900_0000                     # QEMU virt's PL011: MMIO, never the host's memory to share


def _is_memory(snap, pa: int) -> bool:
    return any(base <= pa < base + size for base, size, _ in snap.memblocks)


def refused_alike(hostile, el2, call: str, pa: int, transition: str) -> int:
    """Issue `call` on the page at `pa`; its return must be the model's for the page's states
    in a snapshot just before, and the snapshot after must show nothing changed."""
    before = el2.snapshot()
    mapped = before.host_s2 is not None and (leaf := before.host_s2.leaf_at(pa)) is not None and leaf.valid
    checks_memory = KernelVersion.parse(before.kernel_version).host_state_checks_memory
    want = predict(transition, snapshot_states(before).state(pa), is_memory=_is_memory(before, pa),
                   mapped_non_memory_errno=EINVAL if mapped and not checks_memory else EPERM)
    got = hostile.call(call, pa >> 12)
    assert got.supported, f"{call} was not even dispatched (a0 {got.a0:#x})"
    assert got.ret == want, \
        f"{call}({pa >> 12:#x}) returned {errno_name(got.ret)}, the model predicts {errno_name(want)}"
    if want != 0:
        left = leftovers(before, el2.snapshot())
        assert left == [], f"a refused {call} changed EL2:\n" + "\n".join(map(str, left))
    return got.ret


def test_a_page_shared_twice_is_refused_the_second_time(hostile, el2):
    [page] = hostile.alloc(1)
    assert refused_alike(hostile, el2, SHARE, page.pa, "host_share_hyp") == 0
    assert refused_alike(hostile, el2, SHARE, page.pa, "host_share_hyp") != 0
    assert refused_alike(hostile, el2, UNSHARE, page.pa, "host_unshare_hyp") == 0
    hostile.free(page)


def test_a_page_never_shared_cannot_be_unshared(hostile, el2):
    [page] = hostile.alloc(1)
    assert refused_alike(hostile, el2, UNSHARE, page.pa, "host_unshare_hyp") != 0
    hostile.free(page)


def test_the_hyps_own_memory_cannot_be_shared_or_unshared(hostile, el2):
    hpool = el2.snapshot().pools["hpool"]
    for call, transition in ((SHARE, "host_share_hyp"), (UNSHARE, "host_unshare_hyp")):
        assert refused_alike(hostile, el2, call, hpool.range_start, transition) != 0


def test_mmio_and_addresses_past_memory_cannot_be_shared(hostile, el2, kernel_version):
    snap = el2.snapshot()
    assert refused_alike(hostile, el2, SHARE, UART, "host_share_hyp") != 0, "the UART was shared"
    if not kernel_version.host_state_checks_memory:
        pytest.skip(f"Linux {kernel_version} shares a PFN past the end of memory and can never unshare it (a "
                    "kernel bug, KernelVersion.host_state_checks_memory): shown, and its fix in "
                    "tests/fixes/, by tests/integration/test_error_paths.py")
    past = max(base + size for base, size, _ in snap.memblocks) + (1 << 30)
    assert refused_alike(hostile, el2, SHARE, past, "host_share_hyp") != 0, f"{past:#x} was shared"


def test_a_running_vms_hyp_structures_cannot_be_shared(hostile, el2, target, payload, kernel_version):
    if not kernel_version.has_vm_table:
        pytest.skip(f"Linux {kernel_version} keeps no VM state at EL2")
    guests = BackgroundGuests(target, payload("pkvm_guest"), guest_args(vms=1, vcpus=1, pages=4, hold=4))
    guests.wait("ready")
    vms = el2.snapshot().vms
    try:
        assert vms, "a VM ran but none is in EL2's vm_table"
        assert refused_alike(hostile, el2, SHARE, vms[0].pa & ~0xFFF, "host_share_hyp") != 0
    finally:
        guests.wait("done")


def test_bad_vm_handles_are_refused(hostile, el2):
    calls = [name for name in BAD_HANDLE if hostile.has(name)]
    if not calls:
        pytest.skip("this kernel has no VM hypercalls taking a handle (6.1 has only the share pair)")
    for name in calls:
        before = el2.snapshot()
        got = hostile.call(name, 0xdead)
        assert got.supported and got.ret == BAD_HANDLE[name], \
            f"{name}(0xdead) returned {errno_name(got.ret)}, expected {errno_name(BAD_HANDLE[name])}"
        assert leftovers(before, el2.snapshot()) == []


def test_a_vcpu_donated_to_a_vm_that_does_not_exist_comes_back(hostile, el2):
    """__pkvm_init_vcpu takes the vCPU's memory from the host first and looks the VM up second:
    its error path must give every page back, cleared."""
    if not hostile.has("__pkvm_init_vcpu"):
        pytest.skip("this kernel has no __pkvm_init_vcpu (6.1)")
    pages = -(-el2.kernel.struct("pkvm_hyp_vcpu").size // 4096)
    order = (pages - 1).bit_length()
    [block] = hostile.alloc(1, order)
    before = el2.snapshot()
    got = hostile.call("__pkvm_init_vcpu", 0xdead, 0, block.kva)
    assert got.supported and got.ret == INIT_VCPU_BAD_HANDLE, errno_name(got.ret)
    left = leftovers(before, el2.snapshot())
    assert left == [], "the failed __pkvm_init_vcpu kept what it took:\n" + "\n".join(map(str, left))
    hostile.free(block)


def test_the_hyps_own_memory_cannot_be_donated_for_a_vcpu(hostile, el2):
    """__pkvm_init_vcpu donates the vCPU's memory from the host: given the hyp's own pages (hpool's,
    at their host linear-map address), the donation is refused and nothing changes."""
    if not hostile.has("__pkvm_init_vcpu"):
        pytest.skip("this kernel has no __pkvm_init_vcpu (6.1)")
    [mine] = hostile.alloc(1)
    linear = mine.kva - mine.pa               # the host's linear map: one offset for all of memory
    before = el2.snapshot()
    hpool = before.pools["hpool"].range_start
    got = hostile.call("__pkvm_init_vcpu", 0xdead, 0, hpool + linear)
    assert got.supported and got.ret == INIT_VCPU_NOT_DONATED, errno_name(got.ret)
    left = leftovers(before, el2.snapshot())
    assert left == [], "a refused donation changed EL2:\n" + "\n".join(map(str, left))
    hostile.free(mine)


def test_hypercalls_out_of_range_or_from_init_are_not_dispatched(hostile, el2):
    before = el2.snapshot()
    results = hostile.calls([(max(hostile.ids.values()) + 8,), ("__pkvm_init", 0, 0, 0, 0, 0)])
    assert [r.a0 for r in results] == [SMCCC_RET_NOT_SUPPORTED] * 2
    assert hostile.call("__pkvm_prot_finalize").ret != 0, "pKVM finalized again"
    assert leftovers(before, el2.snapshot()) == []


def test_a_random_mix_of_shares_unshares_and_vms_is_the_models(hostile, el2, target, seed):
    steps = mix(seed)

    def guest(vcpus: int) -> str:
        return f"{GUEST_DIR}/pkvm_guest {guest_args(vms=1, vcpus=vcpus, pages=4)}"

    outcome = run_mix(hostile, steps, guest, el2.snapshot)
    if not outcome.ok:
        short = shortest(hostile, outcome, guest, el2.snapshot)
        pytest.fail(f"seed {seed}: {outcome.finding}\nshortest failing sequence ({len(short)} of "
                    f"{outcome.failed_at + 1} steps): " + ", ".join(map(str, short)))
    print(f"seed {seed}: {outcome.hypercalls} hypercalls in {outcome.seconds:.1f}s, every return and state the model's")
