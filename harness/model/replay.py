"""Replay a trace of EL2 allocator calls in the model and demand the same answers (pure).

Start: each pool as the snapshot taken when the breakpoints were armed showed it (free lists in
kernel order and every page's refcount and order). Then each recorded call, in order:
  init  -> a new pool, as hyp_pool_init builds it (per-VM pools created while tracing)
  alloc -> the model must return the very page the kernel returned (or NULL when it did)
  put / get -> on the page holding the address (host stage-2 code passes PTE addresses); the
           page's refcount in the model must first equal what the kernel held at the call
           (`seen`), so a slipped refcount, or a call missing from the trace, shows at once
  split -> on the pool whose range holds the page, or that admitted it (hyp_split_page takes no
           pool)
A call the model refuses (BuddyBug) is a divergence too: the kernel did something the model says
must BUG. End: each pool still present must match a fresh snapshot exactly.

Pages that enter or leave the allocator outside its API (6.2+ rules, 'external' pages):
  * memcache pages: once a VM's pool is empty, guest_s2_zalloc_page() pops a page from the host's
    memcache and sets its refcount to 1 by hand, untraced (6.12 mem_protect.c:189-207 zeroes its
    hyp_page first; 7.3 :204-222 does not, so its order may be stale). Its guest_s2_get_page() /
    guest_s2_put_page() (7.3 :224-232) are traced hyp_get_page()/hyp_put_page() on the VM's
    pool; at refcount 0 __hyp_attach_page() frees it into that pool without coalescing (at order
    0 from 7.2, at its p->order before), and hyp_alloc_pages may hand it out again. The first
    get/put of such a page admits it into the pool's model with the record's `seen` ([refcount,
    order], the kernel's hyp_page at the call); a get/put of an unknown page without `seen` is a
    divergence. Final snapshots list the external pages found on a pool's free lists, and those
    the model admitted are compared too.
  * on VM teardown, reclaim_guest_pages() (6.12 mem_protect.c:269-287; reclaim_pgtable_pages(),
    7.3 :323-340) drains the VM's pool with hyp_alloc_pages(pool, 0) (traced), then zeroes each
    page's hyp_page (7.3: its refcount) by hand and gives it back to the host; the pkvm_hyp_vm
    holding the pool is donated back as well. Such a pool is absent from the final snapshot; its
    model is dropped there (listed in `dropped`), which is where the replay resynchronises with
    the kernel. The same pages may come back as a later VM's pool (a model whose range a new
    hyp_pool_init overlaps is retired at that init) or, through the memcache, as another pool's
    external pages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from harness.kernel.version import VersionLike
from harness.model.buddy import BuddyBug, HypPool

PAGE = 4096
CONTEXT_OPS = 8


@dataclass
class Divergence:
    seq: int
    pool: str
    op: str
    reason: str
    previous: list[str]                         # the pool's last operations before this one
    model_lists: dict[int, list[int]]           # the model's free lists at the orders concerned
    kernel_lists: dict[int, list[int]] | None   # the kernel's, from the nearest snapshot after

    def render(self) -> str:
        lines = [f"first divergence at operation #{self.seq} on {self.pool}: {self.op}", f"  {self.reason}",
                 "  previous operations on this pool:"]
        lines += [f"    {p}" for p in self.previous] or ["    (none)"]
        def listed(blocks: list[int]) -> str:
            return " ".join(f"{b:#x}" for b in blocks) or "(empty)"

        for order, blocks in sorted(self.model_lists.items()):
            lines.append(f"  model  free_area[{order}] before it: {listed(blocks)}")
            if self.kernel_lists is not None:
                lines.append(f"  kernel free_area[{order}] at the end: {listed(self.kernel_lists.get(order, []))}")
        return "\n".join(lines)


@dataclass
class ReplayResult:
    ops: int
    per_pool: dict[str, dict[str, int]]
    divergence: Divergence | None
    final_mismatches: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.divergence is None and not self.final_mismatches


def _get(op: Any, name: str, default: Any = None) -> Any:
    return op.get(name, default) if isinstance(op, Mapping) else getattr(op, name, default)


def _describe(op: Any) -> str:
    args = ", ".join(f"{k}={v:#x}" if isinstance(v, int) and v > 255 else f"{k}={v}"
                     for k, v in _get(op, "args").items())
    result = _get(op, "result")
    tail = f" -> {result:#x}" if isinstance(result, int) else (" -> NULL" if _get(op, "op") == "alloc" else "")
    return f"#{_get(op, 'seq')} cpu{_get(op, 'cpu')} {_get(op, 'op')}({args}){tail}"


def _model_from(pool: Any, version: VersionLike) -> HypPool:
    nr = (pool.range_end - pool.range_start) // PAGE
    return HypPool.from_state(pool.range_start, nr, pool.pages, pool.free_lists, version=version,
                              max_order=pool.max_order)


class Replayer:
    """The model of every traced pool, fed calls as they come: from a snapshot's pools (`initial`),
    or from nothing (a trace from power-on builds each pool at its hyp_pool_init). `feed` returns
    the first divergence; after one, the replayer is spent (its models no longer follow the
    kernel). `finish` compares the models with a snapshot's pools."""

    def __init__(self, initial: Mapping[int, Any], version: VersionLike,
                 names: Mapping[int, str] | None = None) -> None:
        self.version = version
        self.names = dict(names or {})
        self.models = {pa: _model_from(p, version) for pa, p in initial.items()}
        self.history: dict[int, list[str]] = {pa: [] for pa in self.models}
        self.per_pool: dict[str, dict[str, int]] = {}
        self.dropped: list[str] = []
        self.count = 0
        self.divergence: Divergence | None = None

    def name(self, pa: int) -> str:
        return self.names.get(pa, f"pool@{pa:#x}")

    def feed(self, ops: Iterable[Any], final: Mapping[int, Any] | None = None) -> Divergence | None:
        """Apply `ops` in order; the first divergence (also kept in .divergence), or None. `final`
        (a snapshot after these calls, if there is one) only adds the kernel's lists to the report."""
        if self.divergence is not None:
            return self.divergence
        for op in ops:
            self.count += 1
            self.divergence = self._apply(op, final)
            if self.divergence is not None:
                return self.divergence
        return None

    def result(self) -> ReplayResult:
        return ReplayResult(self.count, self.per_pool, self.divergence, dropped=self.dropped)

    def _diverge(self, op: Any, pa: int, reason: str, orders: Iterable[int], final: Mapping[int, Any] | None,
                 lists: dict[int, list[int]] | None = None) -> Divergence:
        model = self.models.get(pa)
        if lists is None:
            lists = model.free_lists() if model else {}
        kernel = final[pa].free_lists if final is not None and pa in final else None
        wanted = sorted(set(orders))
        return Divergence(_get(op, "seq"), self.name(pa), _describe(op), reason,
                          self.history.get(pa, [])[-CONTEXT_OPS:],
                          {k: lists.get(k, []) for k in wanted},
                          {k: kernel.get(k, []) for k in wanted} if kernel is not None else None)

    def _apply(self, op: Any, final: Mapping[int, Any] | None) -> Divergence | None:
        models = self.models
        kind, args = _get(op, "op"), _get(op, "args")
        pa = _get(op, "pool")
        if kind == "split":
            page = args["addr"]
            pa = next((p for p, m in models.items() if m.range_start <= page < m.range_end), None)
            if pa is None:                      # an admitted memcache page (split after alloc)
                pa = next((p for p, m in models.items() if m.is_tracked(page)), None)
            if pa is None:
                return self._diverge(op, -1, f"split of {page:#x}, which lies in no traced pool", [], final)
        if kind == "init":
            fresh = HypPool(args["pfn"] * PAGE, args["nr_pages"], args["reserved_pages"], version=self.version)
            # Pages of a torn-down VM's pool go back to the host and may come back as a new VM's
            # pool (or its pkvm_hyp_vm, the pool's struct, at the same address): the old model
            # describes memory that was reclaimed, so it retires here.
            for old in [p for p, m in models.items()
                        if p == pa or m.range_start < fresh.range_end and fresh.range_start < m.range_end]:
                del models[old]
                self.dropped.append(self.name(old))
            models[pa] = fresh
            self.history[pa] = []
            self.names.setdefault(pa, f"pool@{pa:#x}")
        elif pa not in models:
            return self._diverge(op, pa, "a call on a pool that neither the snapshot nor a traced hyp_pool_init "
                                         "knows", [], final)
        model = models[pa]
        counts = self.per_pool.setdefault(self.name(pa), {})
        counts[kind] = counts.get(kind, 0) + 1
        try:
            if kind == "alloc":
                before = model.free_lists()          # shown as they were if this call diverges
                predicted = model.alloc(args["order"])
                actual = _get(op, "result")
                if predicted != actual:
                    shown = lambda x: f"{x:#x}" if x is not None else "NULL"   # noqa: E731
                    return self._diverge(op, pa, f"the kernel returned {shown(actual)}, the model predicts "
                                                 f"{shown(predicted)}", range(args["order"], model.max_order + 1),
                                         final, before)
            elif kind in ("put", "get"):
                page = args["addr"] & ~(PAGE - 1)
                seen = _get(op, "seen")
                if model.rules.external_pages and not model.is_tracked(page):
                    if seen is None:
                        return self._diverge(op, pa, f"page {page:#x} is outside the pool and not admitted, and "
                                                     "the record has no `seen` (refcount, order) to admit it "
                                                     "with as a memcache page", [], final)
                    model.admit(page, seen[0], seen[1])     # guest_s2_zalloc_page's untraced refcount = 1
                if seen is not None and model.is_tracked(page) and model.page(page)[0] != seen[0]:
                    return self._diverge(op, pa, f"page {page:#x} had refcount {seen[0]} in the kernel at this "
                                                 f"call, {model.page(page)[0]} in the model: a reference was taken "
                                                 f"or dropped outside the traced calls", [], final)
                (model.put if kind == "put" else model.get)(page)
            elif kind == "split":
                model.split(args["addr"])
        except BuddyBug as e:
            return self._diverge(op, pa, f"the model refuses it: {e}", range(0, model.max_order + 1), final)
        except ValueError as e:
            return self._diverge(op, pa, f"the model cannot apply it: {e}", [], final)
        self.history[pa].append(_describe(op))
        return None

    def compare(self, final: Mapping[int, Any], *, drop_missing: bool = True) -> list[str]:
        """Each model against the kernel's pool in `final` (free lists, and every page it lists).
        A model whose pool is gone from `final` is dropped (a torn-down VM's) when drop_missing."""
        mismatches: list[str] = []
        for pa, model in list(self.models.items()):
            if pa not in final:
                if drop_missing:
                    self.dropped.append(self.name(pa))
                    del self.models[pa]
                continue
            kernel = final[pa]
            mine = model.free_lists()
            for order in sorted(set(mine) | set(kernel.free_lists)):
                if mine.get(order, []) != kernel.free_lists.get(order, []):
                    mismatches.append(
                        f"{self.name(pa)} free_area[{order}]: model {[hex(b) for b in mine.get(order, [])]}, "
                        f"kernel {[hex(b) for b in kernel.free_lists.get(order, [])]}")
            for page, state in kernel.pages.items():     # the pool's pages, and external ones listed free
                if model.is_tracked(page) and model.page(page) != state:
                    mismatches.append(f"{self.name(pa)} page {page:#x}: model {model.page(page)}, kernel {state}")
                    if len(mismatches) > 20:
                        return mismatches
        return mismatches


def replay(initial: Mapping[int, Any], ops: Iterable[Any], final: Mapping[int, Any] | None,
           version: VersionLike, names: Mapping[int, str] | None = None) -> ReplayResult:
    """`initial`/`final`: pool struct PA -> pool state (range_start, range_end, max_order,
    free_lists, pages); `ops`: trace records (seq, cpu, pool, op, args, result); `version`: the
    kernel's, a KernelVersion or the string a saved trace records ("kernel_version": "6.12.117")."""
    replayer = Replayer(initial, version, names)
    if replayer.feed(ops, final) is not None or final is None:
        return replayer.result()
    result = replayer.result()
    result.final_mismatches = replayer.compare(final)     # also lists the dropped pools in result.dropped
    return result
