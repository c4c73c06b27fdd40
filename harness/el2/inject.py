"""Make the Nth call of an EL2 allocation site fail, through QEMU's gdbstub (QEMU 7.2 and 10).

A hardware breakpoint sits at the entry of each allocation site the kernel has (`SITES`, found
by symbol): the buddy allocator (`hyp_alloc_pages`, which fails with NULL), and from 6.12 the
memcache top-up (`refill_memcache`, -ENOMEM) and its admission of each host page
(`admit_host_page`, NULL). Every hit at EL2 is counted per site and, for the allocator, per pool
(hpool, host_s2_pool, or a VM's). At the planned hit the function does not run: x0 gets the
failure value and the PC the return address (x30), as if it had returned at once. Every other hit
is stepped past (never emulated: el2trace sees only what QEMU executes), so a machine under
el2trace sees the failed call as a call that never happened, which is what it is.

`Injector` is a context manager and always detaches; the machine runs on.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.el2.decode import NVHE
from harness.el2.gdbstub import GdbStub, Registers, Stop
from harness.el2.memory import MASK64
from harness.el2.snapshot import El2Reader
from harness.errors import InfraError, UsageError
from harness.model.errnos import ENOMEM

MAX_CHAIN = 16          # callers kept per call: past the page-table walker's recursion to the hypercall
VM_POOL = "vm"          # any VM's pool: they come and go, so they are counted as one
POOLS = ("hpool", "host_s2_pool", VM_POOL)


@dataclass(frozen=True)
class Site:
    name: str            # the nVHE function
    failure: int         # what it returns when it fails (a 64-bit register value)
    says: str            # the failure as the kernel spells it
    pool_arg: bool       # x0 is the struct hyp_pool it allocates from


SITES = (Site("hyp_alloc_pages", 0, "NULL", True),
         Site("refill_memcache", ENOMEM & MASK64, "-ENOMEM", False),
         Site("admit_host_page", 0, "NULL", False))


def sites_of(symbols: dict[str, int]) -> list[Site]:
    """The allocation sites this kernel has (6.1 has only the allocator)."""
    return [s for s in SITES if NVHE + s.name in symbols]


@dataclass(frozen=True)
class Plan:
    """Fail the `nth` call (from 1) of `site`, counting only `pool`'s calls when one is named."""
    site: str
    nth: int
    pool: str | None = None

    def __str__(self) -> str:
        return f"{self.site} call {self.nth}" + (f" in {self.pool}" if self.pool else "")


@dataclass
class Call:
    seq: int                 # from 1, over every site
    site: str
    pool: str | None
    nth: int                 # this call's number at its site, from 1
    nth_in_pool: int         # its number among its pool's calls (the site's, without a pool)
    caller: str              # the function the call returns to, +offset
    chain: list[str]         # the callers beyond it, nearest first, from the frame records
    cpu: int | None
    failed: bool = False

    def __str__(self) -> str:
        which = f"call {self.nth_in_pool} in {self.pool}" if self.pool else f"call {self.nth}"
        return f"{self.site} {which} from {' < '.join([self.caller, *self.chain[:4]])}"

    def under(self, function: str) -> bool:
        """Whether `function` is the caller or one of its callers."""
        return function in (self.caller.split("+")[0], *self.chain)


@dataclass
class Injection:
    plan: Plan | None
    calls: list[Call] = field(default_factory=list)
    hits_not_at_el2: int = 0
    seconds: float = 0.0

    @property
    def fired(self) -> Call | None:
        return next((c for c in self.calls if c.failed), None)

    def counts(self) -> dict[str, int]:
        """Calls per site and pool: "hyp_alloc_pages(hpool)" -> 3."""
        out: dict[str, int] = {}
        for c in self.calls:
            key = f"{c.site}({c.pool})" if c.pool else c.site
            out[key] = out.get(key, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {"plan": str(self.plan) if self.plan else None, "fired": str(self.fired) if self.fired else None,
                "counts": self.counts(), "calls": [asdict(c) for c in self.calls],
                "hits_not_at_el2": self.hits_not_at_el2, "seconds": round(self.seconds, 3)}


class Injector:
    """Counts the allocation sites' calls while armed; fails the planned one (if any)."""

    def __init__(self, reader: El2Reader, gdb: Path | tuple[str, int], plan: Plan | None = None, *,
                 timeout: float = 10.0) -> None:
        self.reader = reader
        self.gdb_address = gdb
        self.timeout = timeout
        self.sites = {s.name: s for s in sites_of(reader.kernel.symbols)}
        if plan is not None and plan.site not in self.sites:
            raise UsageError(f"this kernel has no allocation site {plan.site}",
                             hint="it has " + ", ".join(self.sites))
        self.result = Injection(plan)
        self.error: BaseException | None = None
        self._gdb: GdbStub | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._numbers: dict[tuple[str, str | None], int] = {}

    # --- addresses ---------------------------------------------------------------------------

    def _prepare(self) -> None:
        snap = self.reader.snapshot()
        if snap.hyp_physvirt_offset is None:
            raise InfraError(f"hyp_physvirt_offset could not be read: {snap.unavailable}",
                             hint="the kernel's EL2 layout is not what the decoders know")
        self._off = snap.hyp_physvirt_offset
        # the fixed pools by name; a VM's (even one alive now) counts as VM_POOL
        self._pools = {p.struct_pa: name for name, p in snap.pools.items() if name in POOLS}
        self._entries = {(self.reader.kpa(NVHE + name) - self._off) & MASK64: site
                         for name, site in self.sites.items()}
        # nVHE functions by hyp VA, to name a call's caller
        named = sorted(((self.reader.kernel.symbols[n] - self.reader.kimage_voffset - self._off) & MASK64,
                        n[len(NVHE):]) for n in self.reader.kernel.symbols if n.startswith(NVHE))
        self._fn_addrs = [a for a, _ in named]
        self._fn_names = [n for _, n in named]

    def _function_at(self, va: int) -> str:
        i = bisect.bisect_right(self._fn_addrs, va) - 1
        return f"{self._fn_names[i]}+{va - self._fn_addrs[i]:#x}" if i >= 0 else f"{va:#x}"

    def _pool_of(self, pool_va: int) -> str:
        return self._pools.get((pool_va + self._off) & MASK64, VM_POOL)

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> Injector:
        self._prepare()
        self._gdb = GdbStub(self.gdb_address, self.timeout)
        try:
            self._gdb.run_until_outside_el2()
            for addr in self._entries:
                self._gdb.set_breakpoint(addr)
            self._started = time.monotonic()
            self._gdb.resume()
        except BaseException:
            self._gdb.close()
            raise
        self._thread = threading.Thread(target=self._loop, name="el2-inject", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Injection:
        """Disarm and detach (the machine runs on); the calls seen and the one failed."""
        self._stop.set()
        if self._thread:
            self._thread.join(self.timeout + 5)
            if self._thread.is_alive():        # its socket is not ours to use then
                self.error = self.error or TimeoutError("the injector's stop loop did not end")
        self._close()
        self.result.seconds = time.monotonic() - getattr(self, "_started", time.monotonic())
        if self.error:
            raise self.error
        return self.result

    def _close(self) -> None:
        gdb, self._gdb = self._gdb, None
        if gdb is None:
            return
        try:
            if self.error is None:
                for addr in self._entries:
                    gdb.remove_breakpoint(addr)
        except (OSError, TimeoutError) as e:    # the machine died under us: that is reported elsewhere
            self.error = self.error or e
        finally:
            gdb.close()

    def __enter__(self) -> Injector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread and self._thread.is_alive():
            self._thread.join(self.timeout + 5)
        self._close()

    # --- the stop loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        gdb = self._gdb
        assert gdb is not None

        def on_hit(stop: Stop, regs: Registers) -> bool:
            site = self._entries.get(regs.pc) if regs.el == 2 else None
            if site is None:
                self.result.hits_not_at_el2 += 1
                return False
            if not self._hit(site, stop.cpu, regs.x):
                return False
            gdb.write_register(0, site.failure)      # return at once, failed
            gdb.write_register(32, regs.x[30])
            return True

        try:
            gdb.serve(self._stop, on_hit)            # left stopped at the end: the breakpoints can go
        except BaseException as e:      # surfaced by stop(); the machine is detached at once, to run on
            self.error = e
            gdb.close()

    def _hit(self, site: Site, cpu: int | None, x: tuple[int, ...]) -> bool:
        """Count the call; True if it is the one to fail."""
        pool = self._pool_of(x[0]) if site.pool_arg else None
        at_site = self._bump((site.name, None))
        in_pool = self._bump((site.name, pool)) if pool else at_site
        plan = self.result.plan
        fail = plan is not None and plan.site == site.name and self.result.fired is None \
            and plan.pool in (None, pool) and (in_pool if plan.pool else at_site) == plan.nth
        self.result.calls.append(Call(len(self.result.calls) + 1, site.name, pool, at_site, in_pool,
                                      self._function_at(x[30]), self._chain(x[29]), cpu, fail))
        return fail

    def _chain(self, fp: int) -> list[str]:
        """The callers above the caller: at a function's entry x29 is still its caller's frame
        record, {previous x29, return address}; EL2 code keeps frame records (its stack trace
        on panic walks them too)."""
        assert self._gdb is not None
        out: list[str] = []
        for _ in range(MAX_CHAIN):
            if not fp or fp & 7:
                break
            try:
                record = self._gdb.read_memory(fp, 16)
            except OSError:
                break
            fp, lr = int.from_bytes(record[:8], "little"), int.from_bytes(record[8:], "little")
            if not self._fn_addrs[0] <= lr < self._fn_addrs[-1]:    # left EL2's code: the host's frame
                break
            out.append(self._function_at(lr).split("+")[0])
        return out

    def _bump(self, key: tuple[str, str | None]) -> int:
        self._numbers[key] = self._numbers.get(key, 0) + 1
        return self._numbers[key]
