"""Every page-state transition between host and hyp, judged as the kernel makes it (pure: no I/O).

el2trace records each call of the transition functions of mem_protect.c (share, unshare, donate
either way, pin, unpin: `TRANSITION_OF`), with its pages, its return value and the host hypercall it
ran under. `TransitionChecker` starts from the page states of one snapshot and follows the calls in
order (each runs whole under the host and hyp locks, so the order of their returns is the order
they took effect):

- each call's return is the model's: 0 where the pages are in the states the transition needs,
  -EPERM where one is not, -EBUSY for an unshare of a pinned page; a refused call changes nothing;
- a page the hyp gives back holds none of its data (el2trace scans it at the call: zero past each
  page's first word, the teardown memcache's link);
- at the next snapshot, every page any call named, and every page the hyp owns, shares or borrows
  in either snapshot, is in the state the calls predict: nothing else changed;
- the pages donated for a VM (its pkvm_hyp_vm and PGD at __pkvm_init_vm, each vCPU's structure at
  __pkvm_init_vcpu) all come back to the host at its teardown.

From 6.14 the host/guest calls are followed too (harness.model.guest_transitions): each page's
guest share count is compared as well. Not judged: the FF-A shares (no FF-A on QEMU), and pins
taken before the first snapshot (an unshare of a page shared then may be refused -EBUSY or not).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.model.errnos import EBUSY, EINVAL, ENOMEM, EPERM, errno_name
from harness.model.guest_transitions import DONATE as GUEST_DONATE
from harness.model.guest_transitions import GUEST_FUNCTIONS, PAGE, GuestMap, judge
from harness.model.guest_transitions import SHARE as GUEST_SHARE
from harness.model.stage2 import (
    MASK64,
    STATE_CODES,
    TRANSITIONS,
    IllegalTransition,
    PageStates,
    State,
    in_hyp_linear_map,
    state_name,
)

HANDLE_OFFSET = 0x1000
MAX_LINES = 12                      # page lines per finding; the rest are counted

# mem_protect.c function -> the transition of harness.model.stage2.TRANSITIONS it makes
TRANSITION_OF = {"__pkvm_host_share_hyp": "host_share_hyp", "__pkvm_host_unshare_hyp": "host_unshare_hyp",
                 "__pkvm_host_donate_hyp": "host_donate_hyp", "__pkvm_hyp_donate_host": "hyp_donate_host"}
PIN, UNPIN = "hyp_pin_shared_mem", "hyp_unpin_shared_mem"
HOST_HYP_FUNCTIONS = (*TRANSITION_OF, PIN, UNPIN)     # what el2trace probes for them (6.1: the share pair)
# The hypercalls whose donations belong to a VM, and those that give a VM's memory back.
VM_INIT, VCPU_INIT = "__pkvm_init_vm", "__pkvm_init_vcpu"
VM_TEARDOWN = ("__pkvm_teardown_vm", "__pkvm_finalize_teardown_vm")


def fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & MASK64
    return h


ZERO_HASH = fnv1a(bytes(PAGE - 8))        # a page that is zero past its first word


@dataclass(frozen=True)
class PageScan:
    """What a donation's pages held past their first word (a memcache link) where el2trace
    scanned them: the first non-zero byte, and a hash of each of the first pages."""

    scanned: int
    first_dirty: int | None     # PA of the first non-zero byte in a page past the hashed ones; None: none
    hashes: tuple[int, ...]     # FNV-1a 64 of each of the first pages scanned


@dataclass(frozen=True)
class Transition:
    """One traced call of a transition function."""

    seq: int                  # its return's sequence number
    vcpu: int
    name: str                 # "__pkvm_host_donate_hyp"
    pa: int                   # its first page
    nr_pages: int
    ret: int | None           # what it returned (None: void)
    hypercall: str | None     # the host hypercall it ran under ("__pkvm_init_vm"); None: none seen
    call: int | None          # that hypercall's entry sequence number
    scan: PageScan | None = None   # the donation's pages: given back at its entry, given at its return
    gfn: int | None = None         # a guest call's guest frame
    vm: int | None = None          # a guest call's pkvm_hyp_vm (hyp VA: a key, not read)

    def __str__(self) -> str:
        under = f" in {self.hypercall}" if self.hypercall else ""
        pfn = f"pfn {self.pa >> 12:#x}, " if self.pa else ""
        args = f"{self.pa >> 12:#x}, {self.nr_pages}" if self.gfn is None else \
            f"{pfn}gfn {self.gfn:#x}, {self.nr_pages}, VM@{self.vm or 0:#x}"
        return f"{self.name}({args}) = {errno_name(self.ret)}{under} (seq {self.seq})"

    def pages(self) -> list[int]:
        return [self.pa + i * PAGE for i in range(self.nr_pages)]


Pair = tuple[State, State]          # (host state, hyp state)


@dataclass
class SnapshotStates:
    """A snapshot's page states as the checker compares them: `hyp_pages` every page the hyp
    owns, shares or borrows (with the host's state of it), `state(pa)` any page's pair, and
    `guest_pages` those only the host and guests hold (6.14+), left out when the hyp has neither."""

    hyp_pages: dict[int, Pair]
    state: Callable[[int], Pair]
    guest_pages: set[int] = field(default_factory=set)
    count: Callable[[int], int] = lambda pa: 0      # host_share_guest_count (6.14+)
    memory: Callable[[int], bool] = lambda pa: True  # whether memory backs the page (the memblocks)

    def view(self, pa: int) -> Pair:
        """A page's (host, hyp) states: the hyp's pages as read with them, any other from state()."""
        return self.hyp_pages.get(pa) or self.state(pa)


@dataclass
class VmLedger:
    handle: int
    donated: dict[int, str] = field(default_factory=dict)     # page -> what it was donated as


@dataclass
class TransitionChecker:
    states: PageStates | None = None          # None until seeded from a snapshot
    unknown_pins: set[int] = field(default_factory=set)
    touched: dict[int, Transition] = field(default_factory=dict)   # page -> the last call that named it
    findings: list[str] = field(default_factory=list)
    vms: dict[int, VmLedger] = field(default_factory=dict)
    count: int = 0
    settled: int = 0                          # VM ledgers closed at a teardown
    by_name: dict[str, int] = field(default_factory=dict)
    _in_call: dict[int, list[Transition]] = field(default_factory=dict)   # hypercall entry seq -> its calls
    _seed_state: Callable[[int], Pair] | None = None
    _given: dict[int, int] = field(default_factory=dict)     # page the host donated -> its hash then
    counts: dict[int, int] = field(default_factory=dict)     # page -> guest shares, once a call named it
    guests: GuestMap = field(default_factory=GuestMap)       # (VM, gfn) -> page, from power-on
    guests_traced: bool = False               # the guest calls are traced: their pages are compared too
    _seed_count: Callable[[int], int] | None = None
    _seed_memory: Callable[[int], bool] = lambda pa: True

    def seed(self, snap: SnapshotStates) -> None:
        """Start (again) from a snapshot's states. The pins are not in a snapshot: those counted
        so far stay, and on the first seed every page the hyp borrows has pins nobody counted."""
        host: dict[int, State] = {pa: h for pa, (h, _) in snap.hyp_pages.items() if h != State.OWNED}
        for pa in snap.guest_pages:           # what the host and guests alone hold (6.14+)
            if (state := snap.state(pa)[0]) != State.OWNED:
                host[pa] = state
        hyp: dict[int, State] = {pa: y for pa, (_, y) in snap.hyp_pages.items()}
        borrowed = {pa for pa, (_, y) in snap.hyp_pages.items() if y == State.SHARED_BORROWED}
        pins = {pa: n for pa, n in self.states.pins.items() if pa in borrowed} if self.states else {}
        self.unknown_pins = self.unknown_pins & borrowed if self.states else borrowed
        self.states = PageStates(host, hyp, pins)
        self.touched = {}
        self.counts = {}
        self._seed_state = snap.state
        self._seed_count = snap.count
        self._seed_memory = snap.memory

    def _learn(self, pages: list[int]) -> None:
        """A page first named since the seed: its states as the seed snapshot had them (the seed
        holds only the hyp's pages; a page the host alone holds is looked up when named)."""
        assert self.states is not None
        for pa in pages:
            if pa not in self.touched and pa not in self.states.hyp and self._seed_state is not None:
                host, hyp = self._seed_state(pa)
                self.states.host[pa], self.states.hyp[pa] = host, hyp

    # --- following the calls -------------------------------------------------------------------

    def transition(self, t: Transition) -> None:
        """One call, in order of its return. Before a seed it is only counted."""
        self.count += 1
        self.by_name[t.name] = self.by_name.get(t.name, 0) + 1
        if t.scan is not None and t.ret == 0:
            if t.name == "__pkvm_host_donate_hyp":
                self._given.update(zip(t.pages(), t.scan.hashes))
            elif t.name == "__pkvm_hyp_donate_host":
                self._given_back(t, t.scan)
        if t.call is not None:
            self._in_call.setdefault(t.call, []).append(t)
        if t.name in GUEST_FUNCTIONS:
            self._guest(t)
            return
        if self.states is None:
            return
        self._learn(t.pages())
        for pa in t.pages():
            self.touched[pa] = t
        if t.name in TRANSITION_OF:
            self._transition(t, TRANSITION_OF[t.name])
        elif t.name == PIN:
            self._pin(t)
        elif t.name == UNPIN:
            for pa in t.pages():              # a pin from before the first snapshot was not counted
                self.states.pins[pa] = max(0, self.states.pins.get(pa, 0) - 1)

    def _count(self, pa: int) -> int:
        if pa in self.counts:
            return self.counts[pa]
        return self._seed_count(pa) if self._seed_count is not None else 0

    def _guest(self, t: Transition) -> None:
        """A host/guest call (6.14+): judged once seeded; the guest map follows every success."""
        if self.states is not None:
            self._learn(t.pages() if t.pa else [])    # the page a share or donation names, before judging
        view = self.states.view if self.states is not None else (lambda pa: (State.OWNED, State.NOPAGE))
        out = judge(t, view, self._count, self.guests)
        if t.ret == 0:
            for key, frame in out.frames.items():
                if frame is None:
                    self.guests.frames.pop(key, None)
                else:
                    self.guests.frames[key] = frame
        if self.states is None:
            return
        self._learn(out.pages)                # the pages an unshare or reclaim resolved to
        for pa in out.pages:
            self.touched[pa] = t
        refused_for_memory = t.ret == ENOMEM and out.want == 0 and t.name in (GUEST_SHARE, GUEST_DONATE)
        if out.want is not None and t.ret != out.want and not refused_for_memory:
            why = f" ({out.why})" if out.why else ""
            self.findings.append(f"{t}: the model predicts {errno_name(out.want)}{why}")
        if t.ret == 0:
            for pa, host in out.host.items():
                self.states.host[pa] = host
            self.counts.update(out.counts)

    def _given_back(self, t: Transition, scan: PageScan) -> None:
        """Pages back with the host hold no hyp data: zero past their first word, or what the
        host itself put there when it donated them (a memcache page the hyp never used)."""
        pages = t.pages()
        hyp_data = [pa for pa, h in zip(pages, scan.hashes) if h != ZERO_HASH and self._given.get(pa) != h]
        if scan.first_dirty is not None:      # past the hashed pages: not zero is hyp data
            hyp_data.append(scan.first_dirty & ~(PAGE - 1))
        for pa in pages:
            self._given.pop(pa, None)
        if hyp_data and self.states is not None:
            first = hyp_data[0]
            byte = f" (byte {scan.first_dirty & (PAGE - 1):#x} is not zero)" if scan.first_dirty and \
                scan.first_dirty & ~(PAGE - 1) == first else ""
            self.findings.append(f"{t}: page {first:#x}{byte} goes back to the host holding hyp data "
                                 f"({len(hyp_data)} such page(s), neither zero nor what the host donated): pages "
                                 "the hyp gives back must be cleared first")

    def _transition(self, t: Transition, kind: str) -> None:
        assert self.states is not None
        trial = PageStates(dict(self.states.host), dict(self.states.hyp), dict(self.states.pins))
        try:
            trial.apply(kind, t.pa, t.nr_pages)
            want, why = 0, ""
        except IllegalTransition as e:
            want, why = (EBUSY if "pinned" in str(e) else EPERM), str(e)
        maybe_busy = kind == "host_unshare_hyp" and want == 0 and t.ret == EBUSY and \
            any(pa in self.unknown_pins for pa in t.pages())
        # a mapped non-memory page is refused -EINVAL by 6.1's check walk (before
        # KernelVersion.host_state_checks_memory): accepted as a refusal on every kernel, as the
        # checker does not know the version; the states are still compared
        not_memory = want == EPERM and t.ret == EINVAL and not all(map(self._seed_memory, t.pages()))
        if t.ret != want and not maybe_busy and not not_memory:
            detail = f" ({why})" if why else ""
            self.findings.append(f"{t}: the model predicts {errno_name(want)}{detail}")
        if t.ret == 0:
            if want != 0:              # follow the kernel, so one wrong call is one finding
                self._force(kind, t)
            else:
                self.states = trial
            if kind in ("host_unshare_hyp", "hyp_donate_host"):
                self.unknown_pins.difference_update(t.pages())

    def _force(self, kind: str, t: Transition) -> None:
        assert self.states is not None
        (_, host), (_, hyp) = TRANSITIONS[kind]
        for pa in t.pages():
            self.states.host[pa], self.states.hyp[pa] = host, hyp

    def _pin(self, t: Transition) -> None:
        assert self.states is not None
        bad = [pa for pa in t.pages() if self.states.view(pa) != (State.SHARED_OWNED, State.SHARED_BORROWED)]
        want = EPERM if bad else 0
        if t.ret != want:
            seen = ", ".join(f"{pa:#x} host {h.value}/hyp {y.value}" for pa in bad[:3]
                             for h, y in [self.states.view(pa)])
            self.findings.append(f"{t}: the model predicts {errno_name(want)}"
                                 + (f" (not shared with the hyp: {seen})" if bad else ""))
        if t.ret == 0:
            for pa in t.pages():
                self.states.pins[pa] = self.states.pins.get(pa, 0) + 1

    def hypercall(self, entry_seq: int, name: str, args: tuple[int, ...], result: tuple[int, ...] | None) -> None:
        """A host hypercall's return (after every call it made): a VM's ledger opens at its init
        and is settled at its teardown."""
        calls = self._in_call.pop(entry_seq, [])
        ok = result is not None and len(result) > 1 and result[1] & 0xFFFF_FFFF == 0
        donated = {pa: name for t in calls if t.name == "__pkvm_host_donate_hyp" and t.ret == 0 for pa in t.pages()}
        if name == VM_INIT and result is not None and len(result) > 1 and HANDLE_OFFSET <= result[1] < 1 << 32:
            self.vms[result[1]] = VmLedger(result[1], {pa: "the pkvm_hyp_vm or its PGD (__pkvm_init_vm)"
                                                       for pa in donated})
        elif name == VCPU_INIT and ok and args:
            # a VM made before the first snapshot (or whose init names no handle, 7.x) still owes
            # back what is donated for it from here on
            ledger = self.vms.setdefault(args[0], VmLedger(args[0]))
            ledger.donated.update({pa: "a vCPU structure (__pkvm_init_vcpu)" for pa in donated})
        elif name in VM_TEARDOWN and ok and args and args[0] in self.vms:
            ledger = self.vms.pop(args[0])
            self.settled += 1
            back = {pa for t in calls if t.name == "__pkvm_hyp_donate_host" and t.ret == 0 for pa in t.pages()}
            kept = sorted(set(ledger.donated) - back)
            if kept:
                lines = [f"{pa:#x}: {ledger.donated[pa]}" for pa in kept[:MAX_LINES]]
                more = f"\n    ... and {len(kept) - MAX_LINES} more" if len(kept) > MAX_LINES else ""
                self.findings.append(f"VM {ledger.handle:#x}: {len(kept)} page(s) donated for it were not given "
                                     f"back to the host by {name}:\n    " + "\n    ".join(lines) + more)

    # --- the snapshot ------------------------------------------------------------------------

    def compare(self, snap: SnapshotStates) -> list[str]:
        """The findings since the last compare, then every page a call named or the hyp holds in
        either state against `snap`; the checker then follows `snap` from here."""
        out, self.findings = self.findings, []
        if self.states is None:
            self.seed(snap)
            return out
        pages = set(self.touched) | set(snap.hyp_pages) | {pa for pa, y in self.states.hyp.items()
                                                            if y != State.NOPAGE}
        if self.guests_traced:
            pages |= snap.guest_pages | {pa for pa, n in self.counts.items() if n}
        wrong = []
        for pa in sorted(pages):
            want, seen = self.states.view(pa), snap.view(pa)
            if not self.guests_traced and pa in snap.guest_pages and want[1] == seen[1] == State.NOPAGE:
                continue
            want_n, seen_n = self._count(pa), snap.count(pa)
            if want != seen or want_n != seen_n:
                by = self.touched.get(pa)
                cause = f"after {by}" if by else "no traced transition named it"
                guests = (f", guests {want_n}", f", guests {seen_n}") if want_n != seen_n else ("", "")
                wrong.append(f"page {pa:#x}: expected host {want[0].value} / hyp {want[1].value}{guests[0]} "
                             f"({cause}), saw host {seen[0].value} / hyp {seen[1].value}{guests[1]}")
        if wrong:
            more = f"\n    ... and {len(wrong) - MAX_LINES} more" if len(wrong) > MAX_LINES else ""
            out.append(f"{len(wrong)} page(s) not in the state the traced transitions leave them in:\n    "
                       + "\n    ".join(wrong[:MAX_LINES]) + more)
        self.seed(snap)
        return out


def snapshot_states(snap: Any) -> SnapshotStates:
    """The page states of a Snapshot (harness.el2.state): from the vmemmap where it holds them
    (6.14+), else from the software bits of the hyp's linear map and the host stage-2."""
    memory = [(base, base + size) for base, size, _ in snap.memblocks]

    def is_memory(pa: int) -> bool:
        return not memory or any(start <= pa < end for start, end in memory)

    def pair(pa: int) -> Pair:
        if not is_memory(pa):
            return State.NOPAGE, State.NOPAGE    # not memory: pKVM's checks read it as NOPAGE (-EPERM)
        return _state(snap.host_state(pa)), _state(snap.hyp_state(pa))

    if snap.page_states is not None:
        nopage = STATE_CODES[State.NOPAGE]
        hyp_pages = {pa: (_state(state_name(h)), _state(state_name(y)))
                     for pa, (h, y, _) in snap.page_states.items() if y != nopage}
        guest = {pa for pa, (h, y, count) in snap.page_states.items()
                 if y == nopage and (count or h in (nopage, STATE_CODES[State.SHARED_BORROWED]))}
        return SnapshotStates(hyp_pages, pair, guest, lambda pa: snap.page_state(pa)[2], is_memory)
    if snap.hyp_s1 is None or snap.hyp_physvirt_offset is None or snap.host_s2 is None:
        missing = "hyp_s1" if snap.hyp_s1 is None else "host_s2" if snap.host_s2 is None else "hyp_physvirt_offset"
        raise ValueError(f"the snapshot has no {missing} to read page states from: "
                         f"{snap.unavailable.get(missing, 'not read')}")
    hyp_pages = {}
    for leaf in snap.hyp_s1.leaves:
        if leaf.valid and in_hyp_linear_map(leaf, snap.hyp_physvirt_offset):
            for pa in range(leaf.pa, leaf.pa + leaf.size, PAGE):
                hyp_pages[pa] = (_state(snap.host_state(pa)), _state(leaf.state or "OWNED"))
    return SnapshotStates(hyp_pages, pair, memory=is_memory)


def _state(name: str) -> State:
    """A state by name; an impossible encoding (page-state-pairs reports it) reads as NOPAGE."""
    try:
        return State(name)
    except ValueError:
        return State.NOPAGE
