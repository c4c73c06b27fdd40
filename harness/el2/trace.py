"""Trace every call into the EL2 page allocator of a running QEMU pKVM host.

Hardware breakpoints sit at the hyp VAs of hyp_pool_init, hyp_alloc_pages, hyp_put_page,
hyp_get_page and hyp_split_page (hyp VA = kernel symbol - kimage_voffset - hyp_physvirt_offset).
A hit is recorded only if the CPU is at EL2 (PSTATE.EL). hyp_alloc_pages' result is read at its
return: a second breakpoint at the caller's address (x30), matched to the call by CPU and stack
pointer. QEMU stops every vCPU at each hit (all-stop), so records are in the order the calls
entered; two CPUs racing for one pool's lock could apply in the other order (not seen with the
workloads here; each record keeps its CPU).

Start: the machine is stopped at an instant when no vCPU is at EL2 (so no hyp call is half done),
snapshotted, and the breakpoints are armed before it runs again: the trace and the snapshot
describe the same instant. Stop: interrupt, let any vCPU at EL2 finish (traced) until none is,
final snapshot, remove the breakpoints, detach. `Tracer` is a context manager and always detaches.

Every get and put also records what the kernel's hyp_page held at the call (`seen`), read through
the stopped vCPU's own hyp stage-1 mapping. Replay checks the model against it before each call,
so a call the trace lacks is found at the next call on that page, not only at the end.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.el2 import emulate
from harness.el2 import symbols as ksyms
from harness.el2.decode import NVHE, field_value
from harness.el2.gdbstub import GdbStub, Registers, Stop
from harness.el2.memory import MASK64
from harness.el2.snapshot import El2Reader
from harness.el2.state import Snapshot

FUNCTIONS = ("hyp_pool_init", "hyp_alloc_pages", "hyp_put_page", "hyp_get_page", "hyp_split_page")
U32 = 0xFFFF_FFFF


@dataclass
class Op:
    seq: int
    cpu: int | None
    pool: int | None          # PA of the struct hyp_pool (None for hyp_split_page: no pool argument)
    op: str                   # init, alloc, put, get, split
    args: dict = field(default_factory=dict)   # physical addresses already converted
    result: int | None = None  # alloc: PA of the block, or None for NULL
    seen: list[int] | None = None  # get/put: the page's [refcount, order] in the kernel at entry

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(line: str) -> Op:
        return Op(**json.loads(line))


@dataclass
class Trace:
    ops: list[Op]
    initial: Snapshot | None     # None: traced from power-on (el2trace), every pool built at its init
    final: Snapshot | None
    hits_ignored: int            # breakpoint hits not at EL2 (a host process at the same VA)
    seconds: float
    steps_repeated: int = 0      # single-steps that had to be repeated (see GdbStub.step_past)

    def per_pool(self) -> dict[int | None, dict[str, int]]:
        out: dict[int | None, dict[str, int]] = {}
        for op in self.ops:
            counts = out.setdefault(op.pool, {})
            counts[op.op] = counts.get(op.op, 0) + 1
        return out


class Tracer:
    def __init__(self, reader: El2Reader, gdb: tuple[str, int] | Path, *, timeout: float = 10.0,
                 packet_log: list[str] | None = None, emulate: bool = True) -> None:
        # emulate=False: every breakpoint is stepped over in QEMU. el2trace's callbacks only fire
        # for instructions QEMU executes, so a machine running it must not have any emulated here.
        self.emulate = emulate
        self.packet_log = packet_log
        self.reader = reader
        self.gdb_address = gdb
        self.timeout = timeout
        self.ops: list[Op] = []
        self.hits_ignored = 0
        self.steps_repeated = 0
        self.emulated = 0             # breakpoints passed by emulating their instruction
        self._drain_rounds = 0
        self.error: BaseException | None = None
        self._gdb: GdbStub | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pending: dict[tuple[int | None, int], dict] = {}   # (cpu, sp) -> alloc call awaiting return
        self._return_bps: dict[int, int] = {}                     # return address -> calls waiting on it
        self.initial: Snapshot | None = None
        self._off = self._vmemmap = self._page_size = 0      # from the initial snapshot, at start()
        self._started = 0.0

    # --- addresses ---------------------------------------------------------------------------

    def hyp_va(self, symbol: str) -> int:
        off = self._off
        return (self.reader.kpa(symbol) - off) & MASK64

    def h2p(self, va: int) -> int:
        return (va + self._off) & MASK64

    # --- life cycle -----------------------------------------------------------------------------

    def start(self) -> Snapshot:
        self._gdb = GdbStub(self.gdb_address, self.timeout, log=self.packet_log)
        try:
            # Attaching stops the machine wherever it was, possibly at EL2 inside an allocator
            # call holding a pool lock (a snapshot would then never succeed) or half-way through
            # one (it would change a pool after the snapshot without a record): let it run on,
            # untraced, until no vCPU is at EL2. This snapshot is then both consistent and the
            # trace's starting point.
            self._gdb.run_until_outside_el2()
            self.initial = self.reader.snapshot()
            if self.initial.hyp_physvirt_offset is None or self.initial.vmemmap_va is None:
                raise ksyms.Unavailable("the snapshot lacks hyp_physvirt_offset or the hyp vmemmap: "
                                        f"{self.initial.unavailable}")
            self._off = self.initial.hyp_physvirt_offset
            hp = self.reader.kernel.struct("hyp_page")
            self._vmemmap, self._page_size = self.initial.vmemmap_va, hp.size
            self._page_fields = hp.field("refcount"), hp.field("order")
            self._entries = {self.hyp_va(NVHE + f): f for f in FUNCTIONS}
            # The first instruction of each traced function, for passing its breakpoint without a
            # step where it can be executed here (see harness/el2/emulate.py).
            self._first_insn = {va: int.from_bytes(self.reader.mem.read(self.reader.kpa(NVHE + f), 4), "little")
                                for va, f in self._entries.items()}
            for addr in self._entries:
                self._gdb.set_breakpoint(addr)
            self._started = time.monotonic()
            self._gdb.resume()
        except BaseException:
            self._gdb.close()
            raise
        self._thread = threading.Thread(target=self._loop, name="el2-tracer", daemon=True)
        self._thread.start()
        return self.initial

    def stop(self) -> Trace:
        """Stop tracing: final snapshot with the machine stopped, then detach (it runs on)."""
        self._stop.set()
        if self._thread:
            self._thread.join(self.timeout + 5)
        gdb = self._gdb
        final = None
        try:
            if gdb and self.error is None:
                final = self.reader.snapshot()
                for addr in [*self._entries, *self._return_bps]:
                    gdb.remove_breakpoint(addr)
        finally:
            if gdb:
                gdb.close()
            self._gdb = None
        if self.error:
            raise self.error
        assert self.initial is not None
        return Trace(self.ops, self.initial, final, self.hits_ignored, time.monotonic() - self._started,
                     self.steps_repeated)

    def close(self) -> None:
        """Detach whatever state we are in (used on errors and Ctrl-C)."""
        self._stop.set()
        if self._thread and self._thread.is_alive():
            self._thread.join(self.timeout + 5)
        if self._gdb:
            self._gdb.close()
            self._gdb = None

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the stop loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        gdb = self._gdb
        assert gdb is not None

        def on_hit(stop: Stop, regs: Registers) -> bool:
            self._hit(stop.cpu, regs)
            return self._emulate_over(gdb, regs)

        def done() -> bool:
            """Stopped for the final snapshot, unless a hyp call is under way: let it finish, traced."""
            if not gdb.any_at_el2():
                return True
            self._drain_rounds += 1
            if self._drain_rounds > 200:
                raise RuntimeError("a vCPU stayed at EL2 for 200 rounds at the end of the trace")
            return False

        try:
            gdb.serve(self._stop, on_hit, done)
        except BaseException as e:   # surfaced by stop(); the machine is detached in any case
            self.error = e
        finally:
            self.steps_repeated = gdb.steps_repeated

    def _emulate_over(self, gdb: GdbStub, regs: Registers) -> bool:
        """Pass the breakpoint by executing its instruction here: write the result and PC + 4.
        One debug stop per call instead of a stop and a step (each flushes QEMU's code cache)."""
        insn = self._first_insn.get(regs.pc) if self.emulate else None
        done = emulate.adrp(insn, regs.pc) if insn is not None and regs.el == 2 else None
        if done is None:
            return False
        gdb.write_register(done[0], done[1])
        gdb.write_register(32, regs.pc + 4)
        self.emulated += 1
        return True

    def _record(self, cpu: int | None, pool: int | None, op: str, args: dict, result: int | None = None) -> dict:
        rec = Op(len(self.ops), cpu, pool, op, args, result)
        self.ops.append(rec)
        return rec.__dict__

    def _hit(self, cpu: int | None, r: Registers) -> None:
        if r.el != 2:
            self.hits_ignored += 1
            return
        fn = self._entries.get(r.pc)
        if fn is None:
            self._returned(cpu, r)
            return
        x = r.x
        if fn == "hyp_pool_init":
            self._record(cpu, self.h2p(x[0]), "init",
                         {"pfn": x[1], "nr_pages": x[2] & U32, "reserved_pages": x[3] & U32})
        elif fn == "hyp_alloc_pages":
            rec = self._record(cpu, self.h2p(x[0]), "alloc", {"order": x[1] & 0xFF})
            self._pending[(cpu, r.sp)] = rec
            if x[30] not in self._return_bps and x[30] not in self._entries:
                assert self._gdb is not None
                self._gdb.set_breakpoint(x[30])
            self._return_bps[x[30]] = self._return_bps.get(x[30], 0) + 1
        elif fn in ("hyp_put_page", "hyp_get_page"):
            addr = self.h2p(x[1])
            rec = self._record(cpu, self.h2p(x[0]), fn[4:7], {"addr": addr})
            rec["seen"] = self._page_state(addr)
        elif fn == "hyp_split_page":
            pa = ((x[0] - self._vmemmap) // self._page_size) << 12
            self._record(cpu, None, "split", {"addr": pa})

    def _page_state(self, pa: int) -> list[int]:
        """[refcount, order] of the page holding `pa`, read through the stopped vCPU's hyp VA."""
        assert self._gdb is not None
        raw = self._gdb.read_memory(self._vmemmap + (pa >> 12) * self._page_size, self._page_size)
        return [field_value(raw, f) for f in self._page_fields]

    def _returned(self, cpu: int | None, r: Registers) -> None:
        rec = self._pending.pop((cpu, r.sp), None)
        if rec is None:
            return          # the return address was reached by another path: not our call
        rec["result"] = self.h2p(r.x[0]) if r.x[0] else None
        left = self._return_bps[r.pc] - 1
        if left:
            self._return_bps[r.pc] = left
        else:
            del self._return_bps[r.pc]
            assert self._gdb is not None
            self._gdb.remove_breakpoint(r.pc)


# --- files: trace.jsonl, and the pools of both snapshots ---------------------------------------

def pools_to_json(snap: Snapshot) -> dict:
    """The pool state replay needs, keyed by the struct's PA (JSON object keys are strings)."""
    return {str(p.struct_pa): {"name": name, "range_start": p.range_start, "range_end": p.range_end,
                               "max_order": p.max_order,
                               "free_lists": {str(k): v for k, v in p.free_lists.items()},
                               "pages": {str(pa): list(st) for pa, st in p.pages.items()}}
            for name, p in snap.pools.items()}


@dataclass
class SavedPool:
    name: str
    range_start: int
    range_end: int
    max_order: int
    free_lists: dict[int, list[int]]
    pages: dict[int, tuple[int, int]]


def pools_from_json(data: dict) -> dict[int, SavedPool]:
    return {int(pa): SavedPool(p["name"], p["range_start"], p["range_end"], p["max_order"],
                               {int(k): v for k, v in p["free_lists"].items()},
                               {int(a): (st[0], st[1]) for a, st in p["pages"].items()})
            for pa, p in data.items()}


def save(trace: Trace, run_dir: Path) -> dict[str, Path]:
    """trace.jsonl (one operation a line) and the initial and final snapshots, in run_dir."""
    files = {"trace": run_dir / "trace.jsonl", "initial": run_dir / "snapshot-initial.json",
             "final": run_dir / "snapshot-final.json"}
    files["trace"].write_text("".join(op.to_json() + "\n" for op in trace.ops))
    if trace.initial is None and trace.final is not None:     # from power-on: no pool before the first op
        files["initial"].write_text(json.dumps({"kernel_version": trace.final.kernel_version, "pools": {},
                                                "from": "power-on"}) + "\n")
    for key, snap in (("initial", trace.initial), ("final", trace.final)):
        if snap is not None:
            files[key].write_text(json.dumps({"kernel_version": snap.kernel_version, "pools": pools_to_json(snap),
                                              "snapshot": snap.to_dict()}) + "\n")
    return files


def load(path: Path) -> tuple[list[Op], dict, dict | None]:
    """A saved trace: `path` is trace.jsonl or its directory. Returns (ops, initial, final)."""
    run_dir = path if path.is_dir() else path.parent
    trace_file = path if path.is_file() else run_dir / "trace.jsonl"
    ops = [Op.from_json(line) for line in trace_file.read_text().splitlines() if line.strip()]
    initial = json.loads((run_dir / "snapshot-initial.json").read_text())
    final_file = run_dir / "snapshot-final.json"
    return ops, initial, json.loads(final_file.read_text()) if final_file.is_file() else None
