"""A board's transition oracle: the dump kernel's ring entries as the checker's calls (no machine)."""

from __future__ import annotations

import pytest

from harness.el2.ring import Entry
from harness.el2.ring_transitions import HCALL, HCALL_RET, NO_BYTE, SCAN, SCAN_END, XFER, RingCalls
from harness.el2.tcg.stream import HOST_HCALL_BASE, HostCall
from harness.model.stage2 import State
from harness.model.transitions import ZERO_HASH, SnapshotStates, Transition, TransitionChecker

INIT_VM, TEARDOWN_VM = 17, 21
NAMES = {INIT_VM: "__pkvm_init_vm", TEARDOWN_VM: "__pkvm_teardown_vm"}
PAGE, HANDLE, HOSTS_HASH = 0x4321_0000, 0x1000, 0x1234_5678_9ABC_DEF0
DONATE_HYP, DONATE_HOST, UNPIN = 3, 4, 6


def lifecycle(given_back_hash: int) -> list[Entry]:
    """A VM's init donating one page, then its teardown giving it back, as el2_dump.c records
    them: the init's hypercall at its first transition, the scans just before theirs."""
    return [
        Entry(1, SCAN, 1, 0, HOSTS_HASH, PAGE, 0, 0),                    # the hyp's scan at its return
        Entry(2, SCAN_END, 1, 0, PAGE, NO_BYTE, 1, 0),
        Entry(3, HCALL, 1, 0, 0x5000, 0x6000, INIT_VM, 0),
        Entry(4, XFER, 1, DONATE_HYP, 3, PAGE, 1, 0),
        Entry(5, 3, 0, 0, 0x7F2A_0000, 0x7F30_1000, 1, 0),            # an allocator call on the other CPU
        Entry(6, HCALL_RET, 1, 0, 0, HANDLE, INIT_VM, 3),
        Entry(7, SCAN, 0, 0, given_back_hash, PAGE, 0, 0),               # at __pkvm_hyp_donate_host's entry
        Entry(8, SCAN_END, 0, 0, PAGE, NO_BYTE, 1, 0),
        Entry(9, HCALL, 0, 0, HANDLE, 0, TEARDOWN_VM, 0),
        Entry(10, XFER, 0, DONATE_HOST, 9, PAGE, 1, 0),
        Entry(11, HCALL_RET, 0, 0, 0, 0, TEARDOWN_VM, 9),
    ]


def judged(entries: list[Entry]) -> TransitionChecker:
    checker = TransitionChecker()
    checker.seed(SnapshotStates({}, lambda pa: (State.OWNED, State.NOPAGE)))
    for event in RingCalls(NAMES).feed(entries):
        if isinstance(event, HostCall):
            checker.hypercall(event.entry_seq, event.name, event.args, event.result)
        else:
            checker.transition(event)
    return checker


def test_the_ring_gives_the_calls_el2trace_gives():
    events = RingCalls(NAMES).feed(lifecycle(ZERO_HASH))
    assert [type(e).__name__ for e in events] == ["Transition", "HostCall", "Transition", "HostCall"]
    donate, init, back, teardown = events
    assert isinstance(donate, Transition) and isinstance(back, Transition)
    assert (donate.name, donate.pa, donate.nr_pages, donate.ret, donate.hypercall, donate.call) == \
        ("__pkvm_host_donate_hyp", PAGE, 1, 0, "__pkvm_init_vm", 3)
    assert donate.scan is not None and donate.scan.hashes == (HOSTS_HASH,) and donate.scan.first_dirty is None
    assert init == HostCall(6, 1, HOST_HCALL_BASE + INIT_VM, (0x5000, 0x6000, 0), (0, HANDLE), 3, "__pkvm_init_vm")
    assert (back.name, back.hypercall, back.call, back.vcpu) == ("__pkvm_hyp_donate_host", "__pkvm_teardown_vm", 9, 0)
    assert isinstance(teardown, HostCall) and teardown.args[0] == HANDLE


def test_a_teardown_giving_back_cleared_pages_settles_the_vm():
    checker = judged(lifecycle(ZERO_HASH))
    assert checker.findings == [] and checker.settled == 1 and checker.vms == {}


def test_a_page_given_back_with_hyp_data_in_it_is_found():
    """Mutant 14's bug, as a board's ring shows it: the pkvm_hyp_vm page goes back uncleared."""
    [finding] = judged(lifecycle(0xDEAD_BEEF)).findings
    assert f"__pkvm_hyp_donate_host({PAGE >> 12:#x}, 1) = 0 in __pkvm_teardown_vm" in finding
    assert "goes back to the host holding hyp data" in finding


def test_a_refused_call_and_an_unpin_carry_their_returns():
    entries = [Entry(1, XFER, 0, 2, 0, PAGE, 1, (-1) & 0xFFFF_FFFF),     # unshare refused -EPERM
               Entry(2, XFER, 0, UNPIN, 0, PAGE, 2, 0)]
    unshare, unpin = RingCalls(NAMES).feed(entries)
    assert isinstance(unshare, Transition) and isinstance(unpin, Transition)
    assert (unshare.name, unshare.ret, unshare.hypercall) == ("__pkvm_host_unshare_hyp", -1, None)
    assert (unpin.name, unpin.ret, unpin.nr_pages) == ("hyp_unpin_shared_mem", None, 2)


def test_a_scan_cut_short_is_no_scan():
    """The hyp scans only pages it maps: a giving back it could not scan is judged on its states alone."""
    entries = [Entry(1, SCAN, 0, 0, 0xDEAD, PAGE, 0, 0), Entry(2, XFER, 0, DONATE_HOST, 0, PAGE, 2, 0)]
    [back] = RingCalls(NAMES).feed(entries)
    assert isinstance(back, Transition) and back.scan is None


def test_an_unknown_transition_function_is_refused():
    with pytest.raises(ValueError, match="ring entry 1 is a transition of function 9"):
        RingCalls(NAMES).feed([Entry(1, XFER, 0, 9, 0, PAGE, 1, 0)])
