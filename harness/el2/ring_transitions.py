"""Host/hyp page-state transitions from the dump kernel's event ring: the transition oracle on a board.

On QEMU, el2trace probes each transition function of mem_protect.c (share, unshare, donate either
way, pin, unpin) and the host's hypercalls, and `harness.model.transitions.TransitionChecker`
judges every call. A dump kernel records the same in its ring of transitions (`pkh_xring`, apart
from the allocator's calls, so that a flood of those overwrites none; harness/kernel/el2dump/):

- PKH_XFER at each transition function's end, still under the host and hyp locks: which function,
  its first page, its page count, its return, and the ring number of the hypercall it ran under;
- PKH_SCAN / PKH_SCAN_END for the pages a donation moves, as el2trace scans them: a hash of each
  of the first 16 past its first word, and the first non-zero byte past those (the pages the hyp
  gives back at its entry, those it was given at its return);
- PKH_HCALL / PKH_HCALL_RET for a host hypercall that made a transition (at its first one): its
  id, x1..x3 and x1 at its return. Hypercalls that make none are not recorded (every vCPU run is
  one): the checker needs only those that donate a VM's memory and give it back.

`RingCalls` turns the entries into the checker's Transitions and HostCalls; `RingTransitions`
follows a board's ring from power-on at each snapshot, as el2trace's live replay does on QEMU.
Not recorded: 7.x's range check before the locks (a -EINVAL that changes nothing), and the
host/guest calls of 6.14+ (the checker then leaves the pages only guests and the host hold).
"""

from __future__ import annotations

from collections.abc import Iterable

from harness.el2.decode import NVHE
from harness.el2.dump import DumpMemory
from harness.el2.ring import TRANSITIONS, Entry, RingLost, read
from harness.el2.snapshot import El2Reader
from harness.el2.state import Snapshot
from harness.el2.tcg.stream import HOST_HCALL_BASE, HostCall, judge_in_order
from harness.model.transitions import PIN, UNPIN, PageScan, Transition, TransitionChecker, snapshot_states

HCALL, HCALL_RET, XFER, SCAN, SCAN_END = 6, 7, 8, 9, 10           # enum pkh_kind
FUNCTIONS = {1: "__pkvm_host_share_hyp", 2: "__pkvm_host_unshare_hyp", 3: "__pkvm_host_donate_hyp",
             4: "__pkvm_hyp_donate_host", 5: PIN, 6: UNPIN}        # enum pkh_xfer
SCANNED = ("__pkvm_host_donate_hyp", "__pkvm_hyp_donate_host")
NO_BYTE = (1 << 64) - 1


def _int(u32: int) -> int:
    """A C int from its low 32 bits."""
    return u32 - (1 << 32) if u32 & 0x8000_0000 else u32


class RingCalls:
    """Ring entries, fed once each and in order, as Transitions and HostCalls."""

    def __init__(self, hypercalls: dict[int, str]) -> None:
        self.hypercalls = hypercalls                  # id -> "__pkvm_init_vm" (the vmlinux's enum)
        self._scans: dict[int, list[Entry]] = {}      # CPU -> its scan entries since its last transition
        self._open: dict[int, Entry] = {}             # a hypercall's PKH_HCALL seq -> the entry

    def feed(self, entries: Iterable[Entry]) -> list[Transition | HostCall]:
        out: list[Transition | HostCall] = []
        for e in entries:
            if e.kind in (SCAN, SCAN_END):
                self._scans.setdefault(e.cpu, []).append(e)
            elif e.kind == HCALL:
                self._open[e.seq] = e
            elif e.kind == HCALL_RET:
                entry = self._open.pop(e.b, None)
                if entry is not None:                 # its entry came before this board was followed
                    out.append(HostCall(e.seq, e.cpu, HOST_HCALL_BASE + e.a, (entry.pool, entry.page, entry.b),
                                        (0, e.page), entry.seq, self.hypercalls.get(e.a, "")))
            elif e.kind == XFER:
                out.append(self._transition(e))
        return out

    def _transition(self, e: Entry) -> Transition:
        name = FUNCTIONS.get(e.order)
        if name is None:
            raise ValueError(f"ring entry {e.seq} is a transition of function {e.order}: not one el2_dump.c records")
        scans = self._scans.pop(e.cpu, [])
        scan = _page_scan(scans) if name in SCANNED else None
        hcall = self._open.get(e.pool) if e.pool else None
        return Transition(e.seq, e.cpu, name, e.page, e.a, None if name == UNPIN else _int(e.b),
                          self.hypercalls.get(hcall.a) if hcall else None, hcall.seq if hcall else None, scan)


def _page_scan(scans: list[Entry]) -> PageScan | None:
    """The scan of the pages a donation moves (its entries may come before a snapshot, its call
    after: RingCalls keeps them across feeds). None when the hyp did not scan them: it did not map
    every page it was to give back (a call the kernel refuses)."""
    end = next((s for s in reversed(scans) if s.kind == SCAN_END), None)
    if end is None:
        return None
    hashes = tuple(s.pool for s in sorted((s for s in scans if s.kind == SCAN), key=lambda s: s.a))
    return PageScan(end.a, None if end.page == NO_BYTE else end.page, hashes)


class RingTransitions:
    """Every host/hyp transition a board's ring recorded, judged at each snapshot (the interface
    of el2trace's LiveReplay: `transitions`, `check_transitions(snap)`). From power-on while the
    ring still holds every call since (8,192 entries: about 50 VM lifecycles between two checks);
    where it has overwritten some before they were read, the checker starts again from that
    snapshot, and says so unless that is its first (a session on a board booted long before)."""

    def __init__(self, reader: El2Reader) -> None:
        if not isinstance(reader.mem, DumpMemory):
            raise TypeError("the ring is read through the EL2 dump: it needs a reader over it")
        self.reader = reader
        self.mem: DumpMemory = reader.mem
        self.ring_pa = reader.kpa(TRANSITIONS.symbol)
        self.transitions = TransitionChecker()
        self.calls = RingCalls(reader.kernel.hypercalls)
        self.read_to = 0                               # the ring entries followed so far

    @staticmethod
    def available(reader: El2Reader) -> bool:
        """The ring records transitions: its kernel has the function that writes them."""
        return isinstance(reader.mem, DumpMemory) and NVHE + "pkh_transition" in reader.kernel.symbols

    def check_transitions(self, snapshot: Snapshot) -> list[str]:
        """Every transition up to `snapshot` (the dump just taken: its ring count is the instant's),
        judged, and the page states against it. The first check only starts the model here,
        returning what went wrong since power-on."""
        end = TRANSITIONS.count(self.mem.last_ring)
        try:
            entries = read(self.mem, TRANSITIONS, self.ring_pa, self.read_to, end)
        except RingLost as e:
            first = self.read_to == 0
            self.read_to = end
            self.transitions, self.calls = TransitionChecker(), RingCalls(self.calls.hypercalls)
            self.transitions.compare(snapshot_states(snapshot))
            if first:      # the boot's calls are gone (a later session on the same boot): start here
                return []
            return [f"the transitions since the last check were not judged: {e}; the model starts again here"]
        self.read_to = end
        judge_in_order(self.transitions, self.calls.feed(entries))
        return self.transitions.compare(snapshot_states(snapshot))
