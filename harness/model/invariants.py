"""The invariants of pkvm-internals.md §7 as named checks (pure: no I/O).

They run on an EL2 `Snapshot` (harness.el2.state) or on any hand-built object with the same
attributes: `pools` (name -> range_start, range_end, max_order, free_lists, pages, list_errors),
`host_s2`/`hyp_s1` walks (`leaves` with addr/size/level/pte/valid/pa/state/owner/memattr/
readable/writable/xn, and `tables` as (PA, level)), `memblocks`, `carveout`, `vms`. Quiescent
snapshots only (no CPU inside EL2), which is what El2Reader.snapshot() guarantees.

Each Finding names the check, the pool/page/entry, what was expected and what was seen.
Not checked (documented): §7.5 zeroed free blocks (needs page contents, a snapshot keeps only
metadata), §7.9 table refcounts, §7.15-18 host/hyp cross-consistency (the hyp stage-1 leaves are
decoded, the linear/private split is not).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from harness.kernel.version import MODEL_REFERENCE, KernelVersion, VersionLike
from harness.model.buddy import VersionRules, version_rules

PAGE = 4096
S2_BLOCK_SIZES = {1: 1 << 30, 2: 2 << 20, 3: PAGE}
HYP_OWNED_PTE = 0x4            # FIELD_PREP(KVM_INVALID_PTE_OWNER_MASK, PKVM_ID_HYP)
OWNER_HYP, OWNER_GUEST = 1, 2   # enum pkvm_component_id (GUEST from 6.14)


@dataclass(frozen=True)
class Finding:
    check: str
    where: str
    expected: str
    seen: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.where}: expected {self.expected}, saw {self.seen}"


Check = Callable[[Any, VersionRules], Iterable[Finding]]
# Why a check does not apply to this snapshot's kernel (None: it applies).
Applies = Callable[[Any, VersionRules], str | None]
CHECKS: dict[str, Check] = {}
APPLIES: dict[str, Applies] = {}


def check(name: str, applies: Applies | None = None) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        CHECKS[name] = fn
        if applies is not None:
            APPLIES[name] = applies
        return fn
    return register


@dataclass
class Evaluation:
    """What ran on a snapshot: the rules chosen, the findings, and each check that did not apply."""
    rules: VersionRules
    findings: list[Finding]
    ran: list[str]
    not_applicable: dict[str, str]      # check -> why it does not apply to this kernel

    def summary(self) -> str:
        text = (f"model rules {self.rules.name} for Linux {self.rules.requested}"
                f"{'; ' + self.rules.warning if self.rules.warning else ''}: {len(self.ran)} invariants ran, "
                f"{len(self.findings)} finding(s)")
        for name, why in self.not_applicable.items():
            text += f"\n  not applicable: {name}: {why}"
        return text


def choose_rules(version: VersionLike, shape: dict[str, int] | None = None) -> VersionRules:
    """The buddy rules for the kernel under test, from its version and, where they
    disagree, the shape of struct hyp_page in its DWARF (a backport or vendor kernel). The rules
    say which set was chosen and carry a warning when it was a guess."""
    rules = version_rules(version)
    if not shape:
        return rules
    seen = (shape.get("refcount_bits"), shape.get("order_bits"))
    if (rules.refcount_bits, rules.order_bits) == seen:
        return rules
    by_shape = KernelVersion.first_with_hyp_page_shape(*seen)
    if by_shape is None:
        return replace(rules, warning=f"hyp_page has {seen[0]}-bit refcount and {seen[1]}-bit order, which no "
                                      f"known rule set has; using {rules.name} for Linux {version}")
    chosen = version_rules(by_shape)
    return replace(chosen, requested=str(version),
                   warning=f"Linux {version} but hyp_page is shaped like {chosen.name} "
                           f"({seen[0]}-bit refcount, {seen[1]}-bit order): using the {chosen.name} rules")


def evaluate(snap: Any, version: VersionLike | None = None, only: Iterable[str] | None = None) -> Evaluation:
    """Every registered check (or `only` those) that applies to `snap`'s kernel (`version`, else
    the snapshot's `kernel_version` string, else the model's reference release), which picks the
    buddy rules; the others are listed with the reason, never skipped silently."""
    rules = choose_rules(version or getattr(snap, "kernel_version", None) or MODEL_REFERENCE,
                         getattr(snap, "hyp_page_shape", None))
    result = Evaluation(rules, [], [], {})
    for name, fn in CHECKS.items():
        if only is not None and name not in only:
            continue
        why = APPLIES[name](snap, rules) if name in APPLIES else None
        if why:
            result.not_applicable[name] = why
            continue
        result.ran.append(name)
        result.findings.extend(fn(snap, rules))
    return result


def run_checks(snap: Any, version: VersionLike | None = None, only: Iterable[str] | None = None) -> list[Finding]:
    """The findings of `evaluate()`."""
    return evaluate(snap, version, only).findings


def _absent(part: str) -> Applies:
    """Not applicable when the snapshot says this kernel lacks `part` (Snapshot.absent)."""
    return lambda snap, rules: getattr(snap, "absent", {}).get(part)


def _blocks(pool: Any) -> Iterable[tuple[int, int]]:
    for order, heads in pool.free_lists.items():
        for head in heads:
            yield order, head


def _searchable_top(pool: Any, rules: VersionRules) -> int:
    return pool.max_order if rules.inclusive else pool.max_order - 1


# --- buddy allocator: §7.1-7.4, 7.6-7.8 ------------------------------------------------------

@check("pool-range")
def pool_range(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """§7.1: a non-empty page-aligned range, and max_order as hyp_pool_init computes it."""
    for name, p in snap.pools.items():
        if not (p.range_start < p.range_end and p.range_start % PAGE == 0 and p.range_end % PAGE == 0):
            yield Finding("pool-range", name, "range_start < range_end, both page aligned",
                          f"[{p.range_start:#x}, {p.range_end:#x})")
            continue
        want = rules.max_order((p.range_end - p.range_start) // PAGE)
        if p.max_order != want:
            yield Finding("pool-range", name, f"max_order {want} ({rules.max_order_formula}, rules {rules.name})",
                          f"max_order {p.max_order}")


@check("free-list-links")
def free_list_links(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """§7.2: circular doubly linked lists (the reader reports broken next/prev links)."""
    for name, p in snap.pools.items():
        for err in p.list_errors:
            yield Finding("free-list-links", name, "next->prev == self on every free_area list", err)


@check("free-block-shape")
def free_block_shape(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """§7.3: each listed block is aligned, inside the pool, head (0, k), tails (0, HYP_NO_ORDER),
    and no page is in two blocks."""
    for name, p in snap.pools.items():
        owner: dict[int, int] = {}
        for order, head in _blocks(p):
            where = f"{name} free_area[{order}] block {head:#x}"
            size = PAGE << order
            if head % size or head < p.range_start or head + size > p.range_end:
                yield Finding("free-block-shape", where, f"aligned to {size:#x} and inside the pool",
                              "outside or unaligned")
                continue
            if p.pages.get(head) != (0, order):
                yield Finding("free-block-shape", where, f"head page (refcount 0, order {order})",
                              f"{p.pages.get(head)}")
            for pa in range(head + PAGE, head + size, PAGE):
                if p.pages.get(pa) != (0, rules.hyp_no_order):
                    yield Finding("free-block-shape", f"{where} tail {pa:#x}",
                                  f"(refcount 0, HYP_NO_ORDER {rules.hyp_no_order:#x})", f"{p.pages.get(pa)}")
            for pa in range(head, head + size, PAGE):
                if pa in owner:
                    yield Finding("free-block-shape", f"{name} page {pa:#x}", "in one free block",
                                  f"in blocks {owner[pa]:#x} and {head:#x}")
                owner[pa] = head


@check("maximal-coalescing")
def maximal_coalescing(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """§7.4: no listed block has its equal-order buddy listed too (they would have merged)."""
    for name, p in snap.pools.items():
        listed = {(order, head) for order, head in _blocks(p)}
        for order, head in sorted(listed):
            if order >= _searchable_top(p, rules):
                continue
            buddy = head ^ (PAGE << order)
            if p.range_start <= buddy < p.range_end and (order, buddy) in listed and buddy > head:
                yield Finding("maximal-coalescing", f"{name} free_area[{order}]",
                              f"{head:#x} and its buddy {buddy:#x} merged into an order-{order + 1} block",
                              "both listed at the same order")


@check("page-accounting")
def page_accounting(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """§7.6-7.7: every refcount-0 page is in exactly one listed block; allocated pages have an
    order; free + allocated == nr_pages."""
    for name, p in snap.pools.items():
        in_blocks = {pa for order, head in _blocks(p) for pa in range(head, head + (PAGE << order), PAGE)}
        allocated = 0
        for pa in range(p.range_start, p.range_end, PAGE):
            ref, order = p.pages.get(pa, (None, None))
            if ref is None:
                continue
            if ref == 0 and pa not in in_blocks:
                yield Finding("page-accounting", f"{name} page {pa:#x}", "a refcount-0 page in a listed free block",
                              "in none (leaked from the free lists)")
            if ref > 0:
                allocated += 1
                if order == rules.hyp_no_order:
                    yield Finding("page-accounting", f"{name} page {pa:#x}", "an allocated page with an order",
                                  f"refcount {ref} with HYP_NO_ORDER")
        nr = (p.range_end - p.range_start) // PAGE
        if p.pages and len(in_blocks) + allocated != nr:
            yield Finding("page-accounting", name, f"free {len(in_blocks)} + allocated {allocated} == {nr} pages",
                          f"{len(in_blocks) + allocated}")


@check("pool-ownership")
def pool_ownership(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """§7.8: hpool's allocated pages are exactly the hyp stage-1 table pages, host_s2_pool's
    exactly the host stage-2 table pages; each VM pool is empty (all its pages are the PGD)."""
    for pool_name, walk_name in (("hpool", "hyp_s1"), ("host_s2_pool", "host_s2")):
        pool, tree = snap.pools.get(pool_name), getattr(snap, walk_name, None)
        if pool is None or not pool.pages or tree is None:
            continue
        allocated = {pa for pa, (ref, _) in pool.pages.items() if ref > 0}
        tables = {pa for pa, _ in tree.tables}
        for pa in sorted(tables - allocated):
            yield Finding("pool-ownership", f"{walk_name} table page {pa:#x}", f"allocated from {pool_name}",
                          f"not an allocated {pool_name} page")
        for pa in sorted(allocated - tables):
            yield Finding("pool-ownership", f"{pool_name} page {pa:#x}", f"a {walk_name} table page",
                          "allocated but not in the table tree (leaked)")
    for vm in getattr(snap, "vms", []):
        if vm.pool is None or vm.pgd_phys is None:
            continue
        if vm.pool.free_pages != 0:
            yield Finding("pool-ownership", f"VM {vm.handle:#x} pool", "empty (all pages are the PGD)",
                          f"{vm.pool.free_pages} free pages")


# --- host stage-2: §7.10-7.14, 7.19 ----------------------------------------------------------

def _in_memblock(snap: Any, start: int, end: int) -> bool | None:
    """True if [start, end) lies in one memblock, False if in one gap, None if it straddles."""
    for base, size, _ in snap.memblocks:
        if base <= start and end <= base + size:
            return True
        if start < base + size and base < end:
            return None
    return False


@check("s2-idmap")
def s2_idmap(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """§7.10: every valid leaf maps IPA == PA."""
    for leaf in snap.host_s2.leaves if snap.host_s2 else []:
        if leaf.valid and leaf.pa != leaf.addr:
            yield Finding("s2-idmap", f"host stage-2 leaf {leaf.addr:#x}", f"output {leaf.addr:#x}", f"{leaf.pa:#x}")


def _kv(rules: VersionRules) -> KernelVersion:
    return KernelVersion.of(rules.requested)


# Host stage-2 MemAttr: MT_S2_NORMAL; with KernelVersion.host_s2_memattr_as_s1 also MT_S2_FWB_AS_S1.
S2_MEMATTR_NORMAL, S2_MEMATTR_FWB_AS_S1 = 0xF, 0x7


@check("s2-leaf-attributes")
def s2_leaf_attributes(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """§7.11: a valid leaf lies in one memblock (RWX) or one gap (RW, XN), MemAttr 0xF, and is a
    4 KiB page, 2 MiB block or 1 GiB block at its level. Where the host stage-2 takes stage 1's
    attributes (7.2+), every leaf has the one MemAttr that means so: 0x7 with FWB, 0xF without;
    and there the hyp text is mapped read-only (R--) instead of being unmapped."""
    as_s1 = _kv(rules).host_s2_memattr_as_s1
    valid = [leaf for leaf in (snap.host_s2.leaves if snap.host_s2 else []) if leaf.valid]
    want_attr = S2_MEMATTR_NORMAL
    if as_s1 and valid and valid[0].memattr in (S2_MEMATTR_NORMAL, S2_MEMATTR_FWB_AS_S1):
        want_attr = valid[0].memattr            # FWB or not is the CPU's: one value for every leaf
    for leaf in valid:
        if not leaf.valid:
            continue
        where = f"host stage-2 leaf {leaf.addr:#x}+{leaf.size:#x} (level {leaf.level})"
        if S2_BLOCK_SIZES.get(leaf.level) != leaf.size:
            yield Finding("s2-leaf-attributes", where, "a 4K page at level 3 or a block at level 1/2", "other")
        memory = _in_memblock(snap, leaf.addr, leaf.addr + leaf.size)
        if memory is None:
            yield Finding("s2-leaf-attributes", where, "inside one memblock or one gap", "straddles a memblock edge")
            continue
        text = getattr(snap, "hyp_text", None)
        if _kv(rules).host_maps_hyp_text_read_only and text and text[0] <= leaf.addr < text[1]:
            # The hyp text, read-only for the host to inspect on a hyp panic: R, not W, XN.
            if leaf.memattr != want_attr or not leaf.readable or leaf.writable or not leaf.xn \
                    or leaf.addr + leaf.size > text[1]:
                yield Finding("s2-leaf-attributes", where, f"MemAttr {want_attr:#x}, R-- (hyp text)",
                              f"MemAttr {leaf.memattr:#x}, {leaf.describe().split()[0]}")
            continue
        want_xn = not memory
        if leaf.memattr != want_attr or not (leaf.readable and leaf.writable) or leaf.xn != want_xn:
            perms = ("R" if leaf.readable else "-") + ("W" if leaf.writable else "-") + ("-" if leaf.xn else "X")
            yield Finding("s2-leaf-attributes", where,
                          f"MemAttr {want_attr:#x}, {'RWX (memory)' if memory else 'RW- (MMIO, execute-never)'}",
                          f"MemAttr {leaf.memattr:#x}, {perms}")


@check("s2-invalid-leaves")
def s2_invalid_leaves(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """§7.12: a non-zero invalid leaf is a level-3 hyp-owned annotation (PTE 0x4); never LOCKED.
    With typed invalid PTEs (7.2+): a level-3 DONATION to hyp or to a guest, never LOCKED or POISONED."""
    typed = _kv(rules).typed_invalid_ptes
    for leaf in snap.host_s2.leaves if snap.host_s2 else []:
        if leaf.valid:
            continue
        if typed:
            ok = leaf.level == 3 and leaf.invalid_type == "DONATION" and leaf.owner in (OWNER_HYP, OWNER_GUEST)
            want = "a DONATION to hyp or a guest at level 3"
        else:
            ok, want = leaf.level == 3 and leaf.pte == HYP_OWNED_PTE, "PTE 0x4 (owner hyp) at level 3"
        if not ok:
            yield Finding("s2-invalid-leaves", f"host stage-2 entry {leaf.addr:#x} (level {leaf.level})",
                          want, f"PTE {leaf.pte:#x}")


@check("s2-page-states")
def s2_page_states(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """§7.13: shared states only on level-3 pages, and never RESERVED."""
    for leaf in snap.host_s2.leaves if snap.host_s2 else []:
        if leaf.valid and leaf.state != "OWNED":
            if leaf.state not in ("SHARED_OWNED", "SHARED_BORROWED") or leaf.level != 3:
                yield Finding("s2-page-states", f"host stage-2 leaf {leaf.addr:#x} (level {leaf.level})",
                              "SHARED_OWNED or SHARED_BORROWED on a level-3 page", f"{leaf.state}")


@check("carveout-hyp-owned")
def carveout_hyp_owned(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """§7.14: no valid host mapping covers the hyp carveout; what is annotated says hyp."""
    if not snap.carveout or not snap.host_s2:
        return
    base, size = snap.carveout
    for leaf in snap.host_s2.leaves:
        if leaf.addr < base + size and base < leaf.addr + leaf.size:
            if leaf.valid or leaf.owner != 1:
                yield Finding("carveout-hyp-owned", f"host stage-2 entry {leaf.addr:#x} in the carveout",
                              "invalid, owner hyp", leaf.describe() if hasattr(leaf, "describe") else f"{leaf.pte:#x}")


@check("vm-table", applies=_absent("vm_table"))
def vm_table(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """§7.19: handle == 0x1000 + slot, and the VM's stage-2 PGD is the first page of its pool."""
    for vm in getattr(snap, "vms", []):
        if vm.handle is not None and vm.handle != 0x1000 + vm.index:
            yield Finding("vm-table", f"vm_table[{vm.index}]", f"handle {0x1000 + vm.index:#x}", f"{vm.handle:#x}")
        if vm.pool is not None and vm.pgd_phys is not None and vm.pgd_phys != vm.pool.range_start:
            yield Finding("vm-table", f"vm_table[{vm.index}]", f"PGD at its pool start {vm.pool.range_start:#x}",
                          f"{vm.pgd_phys:#x}")
