"""EL2 allocator calls from the hypervisor's own trace events (7.x).

A 7.x test kernel built with `--config pkvm-el2-dump` has hypervisor trace events for the
allocator's calls (pkh_pool_init, pkh_alloc, pkh_get, pkh_put, pkh_split) and the host's
hypercalls (pkh_hcall, pkh_hcall_ret) in its trace remote (harness/kernel/el2dump/,
harness/targets/hyp_trace.py). `ops_of` turns them into the records the QEMU tracers give
(harness.el2.trace.Op), so the same replay runs on them. The suites on a board read the dump
kernel's event ring instead (harness.el2.ring), which one lock orders across CPUs where the
trace remote merges its per-CPU buffers by timestamp; tests/integration checks these events
against the gdbstub tracer.

`RemoteTracer` has the gdbstub Tracer's shape: `start()` enables the events and takes a snapshot,
`stop()` takes another and returns the Trace between them. Each dump writes a mark into the
trace at its instant ("selftest id=DUMP_MARK|seq", harness.el2.dump), with every other CPU
stopped: the window's calls are exactly the events between the two snapshots' marks.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from harness.el2.dump import DUMP_END, DUMP_MARK, DumpMemory
from harness.el2.snapshot import El2Reader
from harness.el2.state import Snapshot
from harness.el2.trace import Op, Trace
from harness.targets.base import Shell
from harness.targets.hyp_trace import HypEvent, HypTraceRemote

ALLOCATOR_EVENTS = ("pkh_pool_init", "pkh_alloc", "pkh_get", "pkh_put", "pkh_split")
MARK_EVENT = "selftest"
BUFFER_KB = 2048               # per CPU: about 40,000 allocator events (the default 7 KiB holds ~150)


def _num(text: str) -> int:
    return int(text, 0)


def allocator_op(index: int, name: str, cpu: int | None, f: dict[str, int]) -> Op | None:
    """One allocator event, by its name and fields (the pkh_* events' own), as an Op; None for
    any other event. The ring (harness.el2.ring) gives the same fields."""
    if name == "pkh_pool_init":
        args = {"pfn": f["pfn"], "nr_pages": f["nr_pages"], "reserved_pages": f["reserved"]}
        return Op(index, cpu, f["pool"], "init", args)
    if name == "pkh_alloc":
        return Op(index, cpu, f["pool"], "alloc", {"order": f["order"]}, f["page"] or None)
    if name in ("pkh_get", "pkh_put"):
        return Op(index, cpu, f["pool"], name[4:], {"addr": f["page"]}, seen=[f["refcount"], f["order"]])
    if name == "pkh_split":
        return Op(index, cpu, None, "split", {"addr": f["page"]})
    return None


def ops_of(events: Iterable[HypEvent]) -> list[Op]:
    """The allocator events, in tracefs' order (by time across CPUs), as Ops."""
    ops: list[Op] = []
    for e in events:
        if e.name in ALLOCATOR_EVENTS:
            op = allocator_op(len(ops), e.name, e.cpu, {k: _num(v) for k, v in e.fields.items()})
            assert op is not None
            ops.append(op)
    return ops


def mark_index(events: list[HypEvent], seq: int, end: bool = False) -> int | None:
    """Where in the trace (tracefs' merged, time-ordered list) the dump numbered `seq` began (or
    ended) copying."""
    want = DUMP_MARK | (DUMP_END if end else 0) | seq
    return next((i for i, e in enumerate(events)
                 if e.name == MARK_EVENT and _num(e.fields.get("id", "0")) == want), None)


def torn(events: list[HypEvent], seq: int) -> list[HypEvent] | None:
    """Allocator events between a dump's two marks: EL2 changed while it was being copied. None
    when the trace lacks either mark: whether it was torn cannot be known."""
    begin, end = mark_index(events, seq), mark_index(events, seq, end=True)
    if begin is None or end is None:
        return None
    return [e for e in events[begin + 1:end] if e.name in ALLOCATOR_EVENTS]


class RemoteTracer:
    """A window of allocator calls through the trace remote (see the module doc)."""

    def __init__(self, reader: El2Reader, shell: Shell) -> None:
        if not isinstance(reader.mem, DumpMemory):
            raise TypeError("the remote tracer cuts its window at dumps: it needs a reader over the EL2 dump")
        self.reader = reader
        self.remote = HypTraceRemote(shell)
        self.initial: Snapshot | None = None
        self._seq = 0
        self._started = 0.0
        self.text = ""                 # the trace as tracefs printed it: evidence for a failing test

    @staticmethod
    def available(shell: Shell) -> bool:
        remote = HypTraceRemote(shell)
        return remote.present() and set(ALLOCATOR_EVENTS) <= set(remote.events())

    @staticmethod
    def prepare(shell: Shell) -> None:
        """Load the trace buffers and leave them loaded, tracing: before the session's first
        snapshot, because loading shares the buffers with the hyp (its stage-1 grows by a table
        page per 2 MiB) and unloading gives them back. A window then only cuts at its marks."""
        remote = HypTraceRemote(shell)
        if not remote.present():               # mounts tracefs where it is not yet
            raise RuntimeError("this kernel has no hypervisor trace remote (7.x, with NVHE_EL2_DEBUG)")
        if not remote.tracing(BUFFER_KB):
            remote.start((*ALLOCATOR_EVENTS, MARK_EVENT), BUFFER_KB)

    def start(self) -> Snapshot:
        self._started = time.monotonic()
        self.prepare(self.remote.shell)
        self.initial = self.reader.snapshot()
        self._seq = self.reader.mem.last_seq   # type: ignore[union-attr]
        return self.initial

    def stop(self) -> Trace:
        final = self.reader.snapshot()
        seq = self.reader.mem.last_seq   # type: ignore[union-attr]
        self.text, events = self.remote.read()          # tracing stays on (see prepare)
        begin, end = mark_index(events, self._seq, end=True), mark_index(events, seq)
        if begin is None or end is None:
            raise RuntimeError(f"the hypervisor's trace lacks the marks of dumps {self._seq} and {seq}: "
                               "its buffer overflowed (a shorter window, or a bigger buffer_size_kb)")
        for n in (self._seq, seq):
            during = torn(events, n)
            if during is None:
                raise RuntimeError(f"the hypervisor's trace lacks a mark of dump {n}: whether EL2 changed while it "
                                   "was copied cannot be told")
            if during:
                raise RuntimeError(f"EL2 changed while dump {n} was copied ({len(during)} allocator calls, the "
                                   f"first: {during[0].name} {during[0].fields}): its snapshot is not one instant")
        return Trace(ops_of(events[begin + 1:end]), self.initial, final, 0, time.monotonic() - self._started)
