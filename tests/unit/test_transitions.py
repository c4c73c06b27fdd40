"""The transition checker (harness.model.transitions) on hand-made calls and snapshot states."""

from __future__ import annotations

from harness.model.errnos import EBUSY, EINVAL, EPERM
from harness.model.stage2 import State
from harness.model.transitions import (
    ZERO_HASH,
    PageScan,
    SnapshotStates,
    Transition,
    TransitionChecker,
    fnv1a,
)

OWN, SO, SB, N = State.OWNED, State.SHARED_OWNED, State.SHARED_BORROWED, State.NOPAGE
P = 0x4000_0000
HOST_OWNED = (OWN, N)


def states(hyp_pages: dict[int, tuple[State, State]], guest: set[int] | None = None) -> SnapshotStates:
    return SnapshotStates(hyp_pages, lambda pa: hyp_pages.get(pa, HOST_OWNED), guest or set())


def call(name: str, pa: int, nr: int = 1, ret: int | None = 0, hypercall: str | None = None,
         at: int | None = None, seq: int = 0, scan: PageScan | None = None) -> Transition:
    return Transition(seq, 0, name, pa, nr, ret, hypercall, at, scan)


def seeded(hyp_pages: dict[int, tuple[State, State]] | None = None) -> TransitionChecker:
    checker = TransitionChecker()
    assert checker.compare(states(hyp_pages or {})) == []
    return checker


def test_a_share_and_unshare_as_predicted_leave_no_finding():
    checker = seeded()
    checker.transition(call("__pkvm_host_share_hyp", P))
    assert checker.compare(states({P: (SO, SB)})) == []
    checker.transition(call("__pkvm_host_unshare_hyp", P))
    assert checker.compare(states({})) == []


def test_a_share_of_a_page_already_shared_must_be_refused():
    checker = seeded({P: (SO, SB)})
    checker.transition(call("__pkvm_host_share_hyp", P, ret=0))
    [finding] = checker.compare(states({P: (SO, SB)}))
    assert "predicts -EPERM" in finding and "host state SHARED_OWNED, needs OWNED" in finding


def test_a_refused_call_that_the_model_allows_is_reported_with_the_errno():
    checker = seeded()
    checker.transition(call("__pkvm_host_donate_hyp", P, 2, ret=EPERM))
    [finding] = checker.compare(states({}))
    assert "__pkvm_host_donate_hyp(0x40000, 2) = -EPERM" in finding and "predicts 0" in finding


def test_an_unshare_of_a_pinned_page_is_busy():
    checker = seeded()
    checker.transition(call("__pkvm_host_share_hyp", P, seq=1))
    checker.transition(call("hyp_pin_shared_mem", P, seq=2))
    checker.transition(call("__pkvm_host_unshare_hyp", P, ret=EBUSY, seq=3))
    assert checker.compare(states({P: (SO, SB)})) == []
    checker.transition(call("hyp_unpin_shared_mem", P, ret=None, seq=4))
    checker.transition(call("__pkvm_host_unshare_hyp", P, ret=EBUSY, seq=5))
    [finding] = checker.compare(states({P: (SO, SB)}))
    assert "= -EBUSY" in finding and "predicts 0" in finding


def test_pins_from_before_the_first_snapshot_are_not_guessed():
    checker = seeded({P: (SO, SB)})
    checker.transition(call("__pkvm_host_unshare_hyp", P, ret=EBUSY))
    assert checker.compare(states({P: (SO, SB)})) == []


def test_a_page_left_in_another_state_than_predicted_names_the_call():
    checker = seeded({P: (N, OWN)})
    checker.transition(call("__pkvm_hyp_donate_host", P, hypercall="__pkvm_teardown_vm", at=7, seq=9))
    [finding] = checker.compare(SnapshotStates({}, lambda pa: (N, N)))     # the host never got it back
    assert "page 0x40000000: expected host OWNED / hyp NOPAGE" in finding
    assert "after __pkvm_hyp_donate_host(0x40000, 1) = 0 in __pkvm_teardown_vm (seq 9)" in finding
    assert "saw host NOPAGE / hyp NOPAGE" in finding


def test_a_change_no_call_made_is_found():
    checker = seeded({P: (N, OWN)})
    [finding] = checker.compare(states({}))
    assert "no traced transition named it" in finding and "expected host NOPAGE / hyp OWNED" in finding


def test_pages_only_guests_and_the_host_hold_are_left_to_the_guest_checks():
    checker = seeded()
    checker.transition(call("__pkvm_host_share_hyp", P, seq=1))
    checker.transition(call("__pkvm_host_unshare_hyp", P, seq=2))
    # since then, the host shared the page with a guest (6.14+): not a transition between host and hyp
    snap = SnapshotStates({}, lambda pa: (SO, N), {P})
    assert checker.compare(snap) == []


def test_a_page_given_back_with_hyp_data_in_it_is_reported():
    checker = seeded({P: (N, OWN)})
    checker.transition(call("__pkvm_hyp_donate_host", P, scan=PageScan(1, None, (fnv1a(b"\1" * 4088),))))
    [finding] = checker.compare(states({}))
    assert "page 0x40000000 goes back to the host holding hyp data" in finding


def test_past_the_hashed_pages_any_non_zero_byte_is_hyp_data():
    checker = seeded({P + i * 4096: (N, OWN) for i in range(20)})
    host_data = fnv1a(b"host" * 1022)
    checker._given[P] = host_data                          # page 0: as the host gave it
    hashes = (host_data,) + (ZERO_HASH,) * 15
    checker.transition(call("__pkvm_hyp_donate_host", P, 20, scan=PageScan(20, P + 18 * 4096 + 0x20, hashes)))
    [finding] = checker.compare(states({}))
    assert "page 0x40012000 (byte 0x20 is not zero) goes back to the host holding hyp data" in finding


def test_a_page_given_back_as_the_host_gave_it_is_not_hyp_data():
    host_data = fnv1a(b"host" * 1022)
    checker = seeded()
    checker.transition(call("__pkvm_host_donate_hyp", P, scan=PageScan(1, None, (host_data,)), seq=1))
    checker.transition(call("__pkvm_hyp_donate_host", P, scan=PageScan(1, None, (host_data,)), seq=2))
    assert checker.compare(states({})) == []
    # a zero page is clean whatever the host gave; once given back, the host's hash is forgotten
    checker.transition(call("__pkvm_host_donate_hyp", P, scan=PageScan(1, None, (host_data,)), seq=3))
    checker.transition(call("__pkvm_hyp_donate_host", P, scan=PageScan(1, None, (ZERO_HASH,)), seq=4))
    checker.transition(call("__pkvm_host_donate_hyp", P, scan=PageScan(1, None, (ZERO_HASH,)), seq=5))
    checker.transition(call("__pkvm_hyp_donate_host", P, scan=PageScan(1, None, (host_data,)), seq=6))
    [finding] = checker.compare(states({}))
    assert "goes back to the host holding hyp data" in finding


def test_a_vm_whose_teardown_keeps_a_donated_page_is_reported():
    checker = seeded()
    vm, vcpu, back = 0x4100_0000, 0x4200_0000, 0x4300_0000
    checker.transition(call("__pkvm_host_donate_hyp", vm, 2, hypercall="__pkvm_init_vm", at=1, seq=2))
    checker.hypercall(1, "__pkvm_init_vm", (0, 0, 0), (0, 0x1000, 0, 0))
    checker.transition(call("__pkvm_host_donate_hyp", vcpu, 1, hypercall="__pkvm_init_vcpu", at=3, seq=4))
    checker.hypercall(3, "__pkvm_init_vcpu", (0x1000, 0, 0), (0, 0, 0, 0))
    checker.transition(call("__pkvm_host_donate_hyp", back, 1, seq=5))   # donated, then given back below
    checker.transition(call("__pkvm_hyp_donate_host", vm, 2, hypercall="__pkvm_teardown_vm", at=6, seq=7))
    checker.transition(call("__pkvm_hyp_donate_host", back, 1, hypercall="__pkvm_teardown_vm", at=6, seq=8))
    checker.hypercall(6, "__pkvm_teardown_vm", (0x1000,), (0, 0, 0, 0))
    [ledger] = checker.compare(states({vcpu: (N, OWN)}))      # the page states agree: it is still the hyp's
    assert checker.settled == 1
    assert "VM 0x1000: 1 page(s) donated for it were not given back to the host by __pkvm_teardown_vm" in ledger
    assert "0x42000000: a vCPU structure (__pkvm_init_vcpu)" in ledger


def test_an_unpin_of_a_pin_from_before_the_first_snapshot_does_not_leave_a_negative_pin():
    checker = seeded()
    checker.transition(call("__pkvm_host_share_hyp", P, seq=1))
    checker.transition(call("hyp_unpin_shared_mem", P, ret=None, seq=2))
    checker.transition(call("__pkvm_host_unshare_hyp", P, seq=3))
    assert checker.compare(states({})) == []


def test_a_reseed_keeps_the_pages_only_the_host_and_guests_hold():
    checker = TransitionChecker(guests_traced=True)
    live = guest_states({P: (SO, 1)})
    assert checker.compare(live) == [] and checker.compare(live) == []


def test_calls_before_the_first_snapshot_are_counted_not_judged():
    checker = TransitionChecker()
    checker.transition(call("__pkvm_host_share_hyp", P, ret=EPERM))
    assert checker.compare(states({})) == [] and checker.count == 1


# --- the host/guest transitions of 6.14+ --------------------------------------------------------

VM, GFN = 0xFFFF_8000_1234_0000, 0x80


def guest_call(name: str, *, pa: int = 0, gfn: int | None = GFN, nr: int = 1, ret: int = 0, seq: int = 0,
               vm: int | None = VM) -> Transition:
    return Transition(seq, 0, name, pa, nr, ret, None, None, None, gfn, vm)


def guest_states(pages: dict[int, tuple[State, int]]) -> SnapshotStates:
    """A 6.14+ snapshot: the host's state and guest share count of some pages (hyp NOPAGE)."""
    return SnapshotStates({}, lambda pa: (pages.get(pa, (OWN, 0))[0], N), set(pages),
                          lambda pa: pages.get(pa, (OWN, 0))[1])


def guest_checker() -> TransitionChecker:
    checker = TransitionChecker(guests_traced=True)
    assert checker.compare(guest_states({})) == []
    return checker


def test_a_page_shared_with_two_guests_counts_both_and_comes_back_after_both_unshares():
    checker = guest_checker()
    checker.transition(guest_call("__pkvm_host_share_guest", pa=P, seq=1))
    checker.transition(guest_call("__pkvm_host_share_guest", pa=P, vm=VM + 0x1000, seq=2))
    assert checker.compare(guest_states({P: (SO, 2)})) == []
    checker.transition(guest_call("__pkvm_host_unshare_guest", seq=3))        # names the gfn, not the page
    assert checker.compare(guest_states({P: (SO, 1)})) == []
    checker.transition(guest_call("__pkvm_host_unshare_guest", vm=VM + 0x1000, seq=4))
    assert checker.compare(guest_states({})) == []


def test_a_share_count_that_slips_is_found_with_the_call():
    checker = guest_checker()
    checker.transition(guest_call("__pkvm_host_share_guest", pa=P, seq=7))
    [finding] = checker.compare(guest_states({P: (SO, 2)}))       # the kernel counted it twice
    assert "page 0x40000000: expected host SHARED_OWNED / hyp NOPAGE, guests 1" in finding
    assert "__pkvm_host_share_guest(pfn 0x40000, gfn 0x80" in finding and "guests 2" in finding


def test_a_share_of_a_page_the_hyp_borrows_or_a_guest_owns_is_refused():
    checker = guest_checker()
    checker.transition(call("__pkvm_host_share_hyp", P, seq=1))
    checker.transition(guest_call("__pkvm_host_share_guest", pa=P, ret=0, seq=2))
    [finding] = checker.compare(SnapshotStates({P: (SO, SB)}, lambda pa: (SO, SB) if pa == P else (OWN, N),
                                               set(), lambda pa: 1 if pa == P else 0))
    assert "__pkvm_host_share_guest" in finding and "predicts -EPERM" in finding


def test_a_donation_to_a_guest_and_its_reclaim():
    checker = guest_checker()
    checker.transition(guest_call("__pkvm_host_donate_guest", pa=P, seq=1))
    assert checker.compare(guest_states({P: (N, 0)})) == []
    checker.transition(guest_call("__pkvm_guest_share_host", seq=2))
    assert checker.compare(guest_states({P: (SB, 0)})) == []
    checker.transition(guest_call("__pkvm_host_reclaim_page_guest", seq=3))
    assert checker.compare(guest_states({})) == []
    # unsharing what is not mapped is refused, and changes nothing
    checker.transition(guest_call("__pkvm_host_unshare_guest", ret=0, seq=4))
    [finding] = checker.compare(guest_states({}))
    assert "predicts -ENOENT (gfn 0x80+1 is not mapped)" in finding


def test_a_refusal_for_want_of_memcache_pages_changes_nothing():
    checker = guest_checker()
    checker.transition(guest_call("__pkvm_host_share_guest", pa=P, ret=-12, seq=1))
    assert checker.compare(guest_states({})) == []


def test_a_page_that_is_not_memory_is_never_the_hosts_to_share():
    uart = 0x0900_0000

    def not_memory_states() -> SnapshotStates:
        return SnapshotStates({}, lambda pa: (N, N) if pa == uart else HOST_OWNED, memory=lambda pa: pa != uart)

    checker = TransitionChecker()
    assert checker.compare(not_memory_states()) == []
    checker.transition(call("__pkvm_host_share_hyp", uart, ret=EINVAL))     # 6.1: a mapped one, -EINVAL
    checker.transition(call("__pkvm_host_share_hyp", uart, ret=EPERM))      # 6.12+
    assert checker.compare(not_memory_states()) == []
    checker.transition(call("__pkvm_host_share_hyp", uart, ret=0))          # 6.1's bug past the end of memory
    returned, shared = checker.compare(not_memory_states())
    assert "__pkvm_host_share_hyp(0x9000, 1) = 0" in returned and "predicts -EPERM" in returned
    assert "page 0x9000000: expected host SHARED_OWNED" in shared       # followed as the kernel did it
    checker.transition(call("__pkvm_host_share_hyp", P, ret=EINVAL))        # memory: -EINVAL is wrong
    [finding] = checker.compare(not_memory_states())
    assert "= -EINVAL" in finding
