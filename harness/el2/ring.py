"""EL2 allocator calls from the dump kernel's event ring: how a board is traced.

A test kernel built with `--config pkvm-el2-dump` records every allocator call (pool_init, alloc,
get, put, split: the fields of the 7.x pkh_* events) in a ring of its own in hyp memory,
`pkh_ring` (harness/kernel/el2dump/el2_dump.c, pkh_events.h), with the host/hyp transitions
(harness.el2.ring_transitions reads those). One hyp lock orders the ring: its order is the order
the calls took effect on every CPU, where the 7.x trace remote merges its per-CPU buffers by
timestamp. Each dump's header carries the number of events the ring had recorded at its first
and its last copy: a snapshot's dump where they differ is retried (EL2 changed while it was
copied), and the number is where a window is cut.

`RingTracer` has the gdbstub Tracer's shape: `start()` takes a snapshot and notes the ring's
count, `stop()` takes another, then reads the entries between the two counts through one more
dump. An entry's `seq` is its number: one that does not match was overwritten (the ring holds
PKH_RING_LEN calls), and the window is refused rather than replayed with calls missing.

The ring records from power-on: about 7,600 calls by the end of a 6.12 boot, 250 to 750 per VM
lifecycle. While it still holds every call since boot, a `RingHistory` (one per session) keeps
them all, read a slice per window, and `RingTracer.from_boot()` gives the trace from power-on, as
el2trace gives it on QEMU: the model then builds each pool at its init and knows every free
list's order, where a window's replay takes the order the first snapshot found (a bug in that
order, such as freeing to the head of a list, is only seen from power-on).
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass

from harness.el2.decode import NVHE
from harness.el2.dump import Dump, DumpMemory
from harness.el2.events import allocator_op
from harness.el2.pgtable import PAGE_SIZE
from harness.el2.snapshot import El2Reader
from harness.el2.state import Snapshot
from harness.el2.trace import Op, Trace

ENTRY = struct.Struct("<IBBBxQQII")      # seq, kind, cpu, order, pool, page, a, b: struct pkh_event
KINDS = {1: "pkh_pool_init", 2: "pkh_alloc", 3: "pkh_get", 4: "pkh_put", 5: "pkh_split"}   # enum pkh_kind
U32 = 0xFFFF_FFFF


@dataclass(frozen=True)
class Ring:
    """One of the dump kernel's rings: its symbol, how many entries it holds, and where its count
    sits in the dump hypercall's result (el2_dump.c, pkh_ring_events: both counts, packed)."""

    symbol: str
    length: int
    shift: int
    bits: int
    holds: str

    def count(self, packed: int) -> int:
        """This ring's count since boot, from a dump's (or DumpMemory.last_ring's) packed value."""
        return (packed >> self.shift) & ((1 << self.bits) - 1)


ALLOCATOR = Ring(NVHE + "pkh_ring", 32768, 0, 40, "allocator calls")                      # PKH_RING_LEN
TRANSITIONS = Ring(NVHE + "pkh_xring", 8192, 40, 23, "transitions and their hypercalls")   # PKH_XRING_LEN


class RingLost(RuntimeError):
    """The ring no longer holds every call of the window: a shorter window, or read it sooner."""


@dataclass(frozen=True)
class Entry:
    seq: int
    kind: int
    cpu: int
    order: int
    pool: int
    page: int
    a: int
    b: int

    def op(self, index: int) -> Op | None:
        """The allocator call this entry is; None for another kind (a transition, a hypercall)."""
        name = KINDS.get(self.kind)
        if name is None:
            return None
        fields = {"pool": self.pool, "page": self.page, "order": self.order, "refcount": self.a,
                  "pfn": self.page, "nr_pages": self.a, "reserved": self.b}
        return allocator_op(index, name, None if self.cpu == 0xFF else self.cpu, fields)


def ops_of(calls: list[Entry]) -> list[Op]:
    """The allocator calls among the entries, in the ring's order, numbered from 0."""
    ops: list[Op] = []
    for e in calls:
        if (op := e.op(len(ops))) is not None:
            ops.append(op)
    return ops


def slot_pa(ring: Ring, ring_pa: int, n: int) -> int:
    """Where event number n sits: slot (n-1) % length."""
    return ring_pa + ((n - 1) % ring.length) * ENTRY.size


def slots(ring: Ring, ring_pa: int, begin: int, end: int) -> list[int]:
    """The pages holding the entries numbered begin+1 .. end."""
    return sorted({slot_pa(ring, ring_pa, n) & -PAGE_SIZE for n in range(begin + 1, end + 1)})


def entries(dump: Dump, ring: Ring, ring_pa: int, begin: int, end: int) -> list[Entry]:
    """Events begin+1 .. end from a dump of the ring taken after them. RingLost when the ring
    had wrapped past any of them by the dump's instant."""
    made = ring.count(dump.ring[1]) - begin
    if made > ring.length:
        raise RingLost(f"the hyp's ring of {ring.holds} holds {ring.length}; {made} were made since the last read")
    out = []
    for n in range(begin + 1, end + 1):
        e = Entry(*ENTRY.unpack(dump.read(slot_pa(ring, ring_pa, n), ENTRY.size)))
        if e.seq != n & U32:
            raise RingLost(f"the hyp's ring of {ring.holds} holds event {e.seq} where event {n} was (overwritten)")
        out.append(e)
    return out


def read(mem: DumpMemory, ring: Ring, ring_pa: int, begin: int, end: int) -> list[Entry]:
    """Events begin+1 .. end, through one dump of just their slots."""
    return entries(mem.take(slots(ring, ring_pa, begin, end)), ring, ring_pa, begin, end) if end > begin else []


class RingHistory:
    """Every call since boot, as long as the ring has not overwritten one before it was read."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.lost: str | None = None          # why the history is incomplete (then it stays so)

    def extend(self, mem: DumpMemory, ring_pa: int, end: int) -> bool:
        """Read the calls after the last one held, up to number `end`; False once any was lost."""
        begin = len(self.entries)
        if self.lost is None:
            try:
                self.entries += read(mem, ALLOCATOR, ring_pa, begin, end)
            except RingLost as e:
                self.lost = str(e)
        return self.lost is None


class RingTracer:
    """A window of allocator calls through the hyp's event ring (see the module doc)."""

    def __init__(self, reader: El2Reader, history: RingHistory | None = None) -> None:
        if not isinstance(reader.mem, DumpMemory):
            raise TypeError("the ring tracer reads the ring through the EL2 dump: it needs a reader over it")
        self.reader = reader
        self.mem: DumpMemory = reader.mem
        self.history = history
        self.initial: Snapshot | None = None
        self.final: Snapshot | None = None
        self._begin = self._end = 0
        self._started = 0.0

    @staticmethod
    def available(reader: El2Reader) -> bool:
        return isinstance(reader.mem, DumpMemory) and ALLOCATOR.symbol in reader.kernel.symbols

    def start(self) -> Snapshot:
        self._started = time.monotonic()
        self.initial = self.reader.snapshot()
        self._begin = ALLOCATOR.count(self.mem.last_ring)
        return self.initial

    def stop(self) -> Trace:
        self.final = self.reader.snapshot()
        end = self._end = ALLOCATOR.count(self.mem.last_ring)
        ring_pa = self.reader.kpa(ALLOCATOR.symbol)
        if self.history is not None and self.history.extend(self.mem, ring_pa, end):
            calls = self.history.entries[self._begin:end]
        else:
            calls = read(self.mem, ALLOCATOR, ring_pa, self._begin, end)
        return Trace(ops_of(calls), self.initial, self.final, 0, time.monotonic() - self._started)

    def from_boot(self) -> Trace | None:
        """After stop(): every call from power-on to the window's final snapshot, when the
        history still holds them all; None when it does not."""
        if self.history is None or self.history.lost is not None or self.final is None:
            return None
        calls = self.history.entries[:self._end]
        return Trace(ops_of(calls), None, self.final, 0, time.monotonic() - self._started)
