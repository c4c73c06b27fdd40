"""el2trace's record stream, decoded: raw records (`read_records`), and the calls they describe
(`Calls`): allocator operations in the replay's `Op` form, host hypercalls, and the page-state
transitions (harness.model.transitions.Transition), each with the hypercall it ran under.

The stream is the file the plugin appends to while the machine runs; `Follower` reads what is new
each time it is asked, keeping a partial record for the next time.

An allocator call becomes an Op at its return, ordered by the return's sequence number: two vCPUs
that enter calls on one pool race for its lock, and the one that returns first took it first far
more often than the one that entered first. A call whose return is never seen (a tail call) is
ordered at its entry, when the same vCPU enters that function again or the stream ends.
"""

from __future__ import annotations

import gzip
import shutil
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness.el2.decode import field_value, h2p
from harness.el2.symbols import Field
from harness.el2.tcg.probes import PAGE_SCANS, RESULT_REGS, SCAN_HASHED, TRAP, Layout
from harness.el2.trace import Op
from harness.model.guest_transitions import DONATE, FORCE_RECLAIM, GUEST_FUNCTIONS, RECLAIM, SHARE, UNSHARE
from harness.model.transitions import (
    HOST_HYP_FUNCTIONS,
    TRANSITION_OF,
    UNPIN,
    PageScan,
    Transition,
    TransitionChecker,
)

META, PROBE, COVER, STATS, VARS = 1, 2, 3, 4, 5
HEADER = struct.Struct("<IBBHIIQQ")       # len, type, kind, fn, vcpu, failed, seq, pc
NREGS = 10                                # x0..x7, x30, sp
U32 = 0xFFFF_FFFF
EC_HVC64 = 0x16
HOST_HCALL_BASE = 0xC600_0000       # KVM_HOST_SMCCC_ID(0): fast call, SMC64, vendor hyp


class StreamError(ValueError):
    """The file is not an el2trace stream (or is cut in the middle of a record header)."""


@dataclass(frozen=True)
class Record:
    type: int
    kind: str          # 'e' entry, 'r' return (probe records)
    fn: int
    vcpu: int
    failed: int        # bit i: read i could not be made
    seq: int
    pc: int            # link address of the probed instruction
    payload: bytes

    def regs(self) -> list[int]:
        return list(struct.unpack_from(f"<{NREGS}Q", self.payload))


def read_records(data: bytes) -> tuple[list[Record], int]:
    """The whole records in `data`, and how many bytes they take (the rest is a partial record)."""
    out: list[Record] = []
    at = 0
    while at + HEADER.size <= len(data):
        length, rtype, kind, fn, vcpu, failed, seq, pc = HEADER.unpack_from(data, at)
        if length < HEADER.size or rtype not in (META, PROBE, COVER, STATS, VARS):
            raise StreamError(f"no el2trace record at byte {at} (length {length}, type {rtype})")
        if at + length > len(data):
            break
        out.append(Record(rtype, chr(kind) if kind else "", fn, vcpu, failed, seq, pc,
                          data[at + HEADER.size:at + length]))
        at += length
    return out, at


def stream_bytes(run_dir: Path) -> bytes:
    """A run directory's whole stream: el2trace.bin, or el2trace.bin.gz once a session compressed it."""
    raw = run_dir / "el2trace.bin"
    if raw.is_file():
        return raw.read_bytes()
    return gzip.decompress((run_dir / "el2trace.bin.gz").read_bytes())


def compress(path: Path) -> Path:
    """el2trace.bin -> el2trace.bin.gz (gzip -1: about 10x smaller, 2 s for 290 MB), the original
    removed only once the copy is whole."""
    packed = path.with_name(path.name + ".gz")
    part = packed.with_name(packed.name + ".part")
    with open(path, "rb") as src, gzip.open(part, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    part.rename(packed)
    path.unlink()
    return packed


class Follower:
    """Reads the records appended to the stream file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new_records(self) -> list[Record]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        records, used = read_records(data)
        self.offset += used
        return records


@dataclass(frozen=True)
class HostCall:
    """A host hypercall: its SMCCC function id and arguments at entry, x0..x3 at return."""

    seq: int
    vcpu: int
    function: int
    args: tuple[int, ...]
    result: tuple[int, ...] | None = None
    entry_seq: int = -1
    name: str = ""           # "__pkvm_init_vm" (enum __kvm_host_smccc_func); "" when not a host hypercall


@dataclass
class Coverage:
    blocks: list[tuple[int, int, int]] = field(default_factory=list)   # (link start, size, count)
    probe_hits_not_at_el2: int = 0
    read_failures: int = 0
    delta_learnt: bool = False


class Calls:
    """Turns records into Ops, HostCalls and Transitions, in order. Feed it every record of one
    stream; the transitions collect in `transitions` for the caller to take."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.fields = {n: Field(**f) for n, f in layout.page_fields.items()}
        self.delta: int | None = None         # link - hyp VA
        self.vmemmap = 0                      # hyp VA of the hyp_page array
        self.physvirt: int | None = None      # hyp PA - hyp VA
        self.coverage = Coverage()
        self._names = layout.pool_links()     # global pool's link address -> name
        self._open: dict[tuple[int, int], tuple[Record, list[bytes]]] = {}   # (vcpu, fn) -> entry
        self._seq = 0
        self._trap = layout.functions.index(TRAP)
        self._hypercalls = layout.hypercall_names()
        self._under: dict[tuple[int, int], tuple[int, str] | None] = {}   # (vcpu, fn) -> (trap entry seq, name)
        self.transitions: list[Transition] = []

    def pa(self, va: int) -> int:
        return h2p(self.physvirt, va)

    def pool_names(self) -> dict[int, str]:
        """Pool struct PA -> symbol name, for the pools that are kernel globals (hpool, host_s2_pool)."""
        if self.delta is None or self.physvirt is None:
            return {}
        return {self.pa(link - self.delta): name for link, name in self._names.items()}

    def feed(self, records: Iterable[Record]) -> tuple[list[Op], list[HostCall]]:
        ops: list[Op] = []
        calls: list[HostCall] = []
        for r in records:
            if r.type == META:
                (self.delta,) = struct.unpack_from("<Q", r.payload)
            elif r.type == VARS:
                self.vmemmap, self.physvirt = struct.unpack_from("<QQ", r.payload)
            elif r.type == COVER:
                start, size, _pad, count = struct.unpack_from("<QIIQ", r.payload)
                self.coverage.blocks.append((start, size, count))
            elif r.type == STATS:
                ignored, failures, _blocks, learnt = struct.unpack_from("<4Q", r.payload)
                self.coverage.probe_hits_not_at_el2, self.coverage.read_failures = ignored, failures
                self.coverage.delta_learnt = bool(learnt)
            elif r.type == PROBE:
                self._probe(r, ops, calls)
        return ops, calls

    def flush(self) -> list[Op]:
        """Calls still open (entered, no return seen), in entry order: at the end of a stream."""
        ops = [op for entry, reads in sorted(self._open.values(), key=lambda e: e[0].seq)
               if (op := self._op(entry, reads, None)) is not None]
        self._open.clear()
        return ops

    # --- probes ------------------------------------------------------------------------------

    def _reads(self, r: Record) -> list[bytes]:
        at = 8 * (NREGS + len(self.layout.extra_registers))
        out = []
        for length in self.layout.reads.get(f"{r.fn}{r.kind}", []):
            out.append(r.payload[at:at + length])
            at += length
        return out

    def _probe(self, r: Record, ops: list[Op], calls: list[HostCall]) -> None:
        name = self.layout.functions[r.fn] if r.fn < len(self.layout.functions) else "?"
        key = (r.vcpu, r.fn)
        if r.kind == "e" and (name in HOST_HYP_FUNCTIONS or name in GUEST_FUNCTIONS):
            self._under[key] = self._hypercall_open(r.vcpu)
        if r.kind == "e":
            if key in self._open:              # its return was never seen: order it at its entry
                if (op := self._op(*self._open.pop(key), None)) is not None:
                    ops.append(op)
            self._open[key] = (r, self._reads(r))
            return
        opened = self._open.pop(key, None)
        if opened is None:
            return                             # a return whose entry came before the stream began
        entry, reads = opened
        if name == TRAP:
            if (call := self._host_call(entry, reads, r)) is not None:
                calls.append(call)
        elif name in HOST_HYP_FUNCTIONS:
            if (t := self._transition(name, entry, reads, r)) is not None:
                self.transitions.append(t)
        elif name in GUEST_FUNCTIONS:
            self.transitions.append(self._guest_transition(name, entry, reads, r))
        elif (op := self._op(entry, reads, r)) is not None:
            ops.append(op)

    def _hypercall_of(self, entry: Record, reads: list[bytes]) -> tuple[int, str] | None:
        """(function id, name) of the host hypercall a handle_trap entry is; None for another trap."""
        extra = struct.unpack_from(f"<{len(self.layout.extra_registers)}Q", entry.payload, 8 * NREGS)
        esr = extra[0] if extra else 0
        if (esr >> 26) & 0x3F != EC_HVC64 or not reads:
            return None                        # a stage-2 fault or another trap, not a hypercall
        function = struct.unpack_from("<Q", reads[0])[0]
        return function, self._hypercalls.get(function - HOST_HCALL_BASE, "")

    def _hypercall_open(self, vcpu: int) -> tuple[int, str] | None:
        """(entry seq, name) of the host hypercall this vCPU is in, if any."""
        opened = self._open.get((vcpu, self._trap))
        hcall = self._hypercall_of(*opened) if opened is not None else None
        return (opened[0].seq, hcall[1]) if opened is not None and hcall is not None else None

    def _host_call(self, entry: Record, reads: list[bytes], ret: Record) -> HostCall | None:
        hcall = self._hypercall_of(entry, reads)
        if hcall is None:
            return None
        regs = struct.unpack_from("<8Q", reads[0])
        result = struct.unpack_from(f"<{RESULT_REGS}Q", self._reads(ret)[0]) if self._reads(ret) else None
        return HostCall(ret.seq, entry.vcpu, regs[0], tuple(regs[1:]), result, entry.seq, hcall[1])

    def _guest_transition(self, name: str, entry: Record, reads: list[bytes], ret: Record) -> Transition:
        """A host/guest call: its page (where it names one), guest frame, count and VM (the
        pkvm_hyp_vm's hyp VA, read from the vCPU where the call takes one)."""
        x = entry.regs()
        read_vm = struct.unpack_from("<Q", reads[0])[0] if reads and not entry.failed & 1 else None
        pa, gfn, nr, vm = {
            SHARE: (x[0] << 12, x[1], x[2], read_vm), UNSHARE: (0, x[0], x[1], x[2]),
            DONATE: (x[0] << 12, x[1], 1, read_vm), RECLAIM: (0, x[0], 1, x[1]),
            FORCE_RECLAIM: (x[0] & ~0xFFF, None, 1, None),
        }.get(name, (0, x[1], 1, read_vm))                           # the guest's share / unshare
        hcall, call = self._take_under(entry)
        return Transition(ret.seq, entry.vcpu, name, pa, nr, _int(ret.regs()[0]), hcall, call, None, gfn, vm)

    def _transition(self, name: str, entry: Record, reads: list[bytes], ret: Record) -> Transition | None:
        if self.physvirt is None:
            return None
        x = entry.regs()
        if name in TRANSITION_OF:
            pa, nr_pages = x[0] << 12, 1 if name in ("__pkvm_host_share_hyp", "__pkvm_host_unshare_hyp") else x[1]
        else:                                  # pin, unpin: [from, to) hyp VAs
            start, end = x[0] & ~0xFFF, (x[1] + 0xFFF) & ~0xFFF
            pa, nr_pages = self.pa(start), (end - start) >> 12
        ret_value = None if name == UNPIN else _int(ret.regs()[0])
        scan = None
        if name in PAGE_SCANS:
            where, at = (entry, reads) if PAGE_SCANS[name][0] == "e" else (ret, self._reads(ret))
            if at and not where.failed & 1:
                scanned, first, *hashes = struct.unpack_from(f"<QQ{SCAN_HASHED}Q", at[0])
                scan = PageScan(scanned, None if first == (1 << 64) - 1 else first,
                                tuple(hashes[:min(scanned, SCAN_HASHED)]))
        hcall, call = self._take_under(entry)
        return Transition(ret.seq, entry.vcpu, name, pa, nr_pages, ret_value, hcall, call, scan)

    def _take_under(self, entry: Record) -> tuple[str | None, int | None]:
        """(name, entry seq) of the host hypercall a transition's entry ran under, if any."""
        under = self._under.pop((entry.vcpu, entry.fn), None)
        return (under[1], under[0]) if under else (None, None)

    def _op(self, entry: Record, reads: list[bytes], ret: Record | None) -> Op | None:
        name = self.layout.functions[entry.fn]
        if name == TRAP or self.physvirt is None:
            return None
        x = entry.regs()
        seq = ret.seq if ret is not None else entry.seq
        if name == "hyp_pool_init":
            return Op(seq, entry.vcpu, self.pa(x[0]), "init",
                      {"pfn": x[1], "nr_pages": x[2] & U32, "reserved_pages": x[3] & U32})
        if name == "hyp_alloc_pages":
            if ret is None:
                return None                    # no result to compare
            result = ret.regs()[0]
            return Op(seq, entry.vcpu, self.pa(x[0]), "alloc", {"order": x[1] & 0xFF},
                      self.pa(result) if result else None)
        if name in ("hyp_put_page", "hyp_get_page"):
            seen = None
            if reads and not entry.failed & 1:
                seen = [field_value(reads[0], self.fields["refcount"]), field_value(reads[0], self.fields["order"])]
            return Op(seq, entry.vcpu, self.pa(x[0]), name[4:7], {"addr": self.pa(x[1])}, seen=seen)
        if name == "hyp_split_page":
            return Op(seq, entry.vcpu, None, "split",
                      {"addr": ((x[0] - self.vmemmap) // self.layout.page_size) << 12})
        return None


def judge_in_order(checker: TransitionChecker, events: Iterable[Transition | HostCall]) -> None:
    """Transitions and host hypercalls to the checker, in order of their sequence numbers (a
    hypercall's return settles the calls it made)."""
    for event in sorted(events, key=lambda e: e.seq):
        if isinstance(event, HostCall):
            checker.hypercall(event.entry_seq, event.name, event.args, event.result)
        else:
            checker.transition(event)


def _int(x0: int) -> int:
    """A C int return value from x0."""
    return int(struct.unpack("<i", struct.pack("<I", x0 & U32))[0])


def decode_file(path: Path, layout: Layout) -> Iterator[Op | HostCall]:
    """Every call in a finished stream file, in order (ops and host calls by sequence number)."""
    records, _ = read_records(path.read_bytes())
    calls = Calls(layout)
    ops, hcalls = calls.feed(records)
    everything: list[Op | HostCall] = [*ops, *calls.flush(), *hcalls]
    yield from sorted(everything, key=lambda c: c.seq)
