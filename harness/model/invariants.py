"""The invariants of pkvm-internals.md §7 as named checks (pure: no I/O).

They run on an EL2 `Snapshot` (harness.el2.state) or on any hand-built object with the same
attributes: `pools` (name -> range_start, range_end, max_order, free_lists, pages, list_errors),
`host_s2`/`hyp_s1` walks (`leaves` with addr/size/level/pte/valid/pa/state/owner/memattr/
readable/writable/xn, and `tables` as (PA, level)), `memblocks`, `carveout`, `vms`. Quiescent
snapshots only (no CPU inside EL2), which is what El2Reader.snapshot() guarantees.

Each Finding names the check, the pool/page/entry, what was expected and what was seen.
Page states (6.14+, where the vmemmap holds them): the host's and the hyp's states agree with
each other, with the host stage-2 and with the hyp stage-1; each page's host_share_guest_count
with the guests' stage-2 mappings at EL2; each VM's stage-2 maps only what was shared with or
donated to it. An input the kernel has but the reader lost is a finding, not a pass.
Not checked (documented): §7.5 zeroed free blocks (needs page contents, a snapshot keeps only
metadata), §7.9 table refcounts, hyp stage-1 permissions (W+X, text read-only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from harness.kernel.version import MODEL_REFERENCE, KernelVersion, VersionLike
from harness.model.buddy import VersionRules, version_rules
from harness.model.sizing import hyp_reserve
from harness.model.stage2 import (
    DEFAULT_VMEMMAP_STATE,
    MEMATTR_FWB_AS_S1,
    MEMATTR_NORMAL,
    STATE_CODES,
    STATE_OF_CODE,
    State,
    in_hyp_linear_map,
    state_name,
)

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


class MissingInput(Exception):
    """A check's input is missing from the snapshot although the kernel has it (unavailable)."""


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
        try:
            result.findings.extend(fn(snap, rules))
        except MissingInput as e:           # an input this kernel has but the reader lost: not a pass
            result.findings.append(Finding(name, "the snapshot", "its input", str(e)))
    return result


def render(findings: Iterable[Finding]) -> str:
    """Findings one per line, as a failing test's message shows them."""
    return "\n".join(str(f) for f in findings)


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
            if rules.external_pages and not p.range_start <= head < p.range_end:
                # A page from outside the pool freed into it (6.2+: host memcache pages in a VM's
                # pool): never coalesced, so it is alone in its block.
                if p.pages.get(head) != (0, order):
                    yield Finding("free-block-shape", f"{where} (external)", f"(refcount 0, order {order})",
                                  f"{p.pages.get(head)}")
                continue
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


@check("free-blocks-zero")
def free_blocks_zero(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """§7.5: a free block is all zeroes past the list node at its start: __hyp_attach_page clears
    a block as it is freed, page_remove_from_list a node as it leaves its list. Anything else is a
    page that leaks what it held and hands stale entries to its next page-table user."""
    for name, p in snap.pools.items():
        dirty = getattr(p, "dirty_free", None)
        if dirty is None:
            raise MissingInput(f"the contents of {name}'s free blocks could not be read")
        for head, order, offset in dirty:
            yield Finding("free-blocks-zero", f"{name} free_area[{order}] block {head:#x}",
                          "zero past its list node (cleared when freed)",
                          f"a non-zero byte at +{offset:#x}: the block was not cleared when it was freed, "
                          "or a list node was not when it was taken off its list")


@check("pool-sizes")
def pool_sizes(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """Exact accounting: hpool holds hyp_s1_pgtable_pages() pages and host_s2_pool
    host_s2_pgtable_pages(), as the sizing model computes them from the hyp memblocks (the same
    numbers kvm_hyp_reserve() reserved the carveout with)."""
    if not snap.memblocks:
        raise MissingInput(f"the hyp memblocks could not be read: {snap.unavailable.get('memblocks')}")
    # only the vmemmap's share of the reserve depends on sizeof(struct hyp_page): not the pools'
    want = hyp_reserve([(base, size) for base, size, _ in snap.memblocks], _kv(rules), 4)
    for name, pages in (("hpool", want.hyp_s1), ("host_s2_pool", want.host_s2)):
        pool = snap.pools.get(name)
        if pool is None:
            raise MissingInput(f"{name} could not be read: {snap.unavailable.get('pool ' + name)}")
        if pool.nr_pages != pages:
            yield Finding("pool-sizes", name, f"{pages} pages (the sizing model, from {len(snap.memblocks)} "
                                              "memblock(s))", f"{pool.nr_pages} pages")


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
        in_blocks = {pa for order, head in _blocks(p) for pa in range(head, head + (PAGE << order), PAGE)
                     if p.range_start <= pa < p.range_end}
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
        in_range = sum(1 << order for order, head in _blocks(vm.pool)
                       if vm.pool.range_start <= head < vm.pool.range_end)
        if in_range:
            yield Finding("pool-ownership", f"VM {vm.handle:#x} pool", "no free page of its own (all are the PGD)",
                          f"{in_range} free pages")


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
    for leaf in _host_s2(snap).leaves:
        if leaf.valid and leaf.pa != leaf.addr:
            yield Finding("s2-idmap", f"host stage-2 leaf {leaf.addr:#x}", f"output {leaf.addr:#x}", f"{leaf.pa:#x}")


def _host_s2(snap: Any) -> Any:
    """The host stage-2 walk; one that could not be read is a finding, never an empty pass."""
    if getattr(snap, "host_s2", None) is None:
        raise MissingInput(f"the host stage-2 could not be read: {getattr(snap, 'unavailable', {}).get('host_s2')}")
    return snap.host_s2


def _hyp_s1(snap: Any) -> Any:
    if getattr(snap, "hyp_s1", None) is None:
        raise MissingInput(f"the hyp stage-1 could not be read: {getattr(snap, 'unavailable', {}).get('hyp_s1')}")
    return snap.hyp_s1


def _kv(rules: VersionRules) -> KernelVersion:
    return KernelVersion.of(rules.requested)


@check("s2-leaf-attributes")
def s2_leaf_attributes(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """§7.11: a valid leaf lies in one memblock (RWX) or one gap (RW, XN), MemAttr 0xF, and is a
    4 KiB page, 2 MiB block or 1 GiB block at its level. Where the host stage-2 takes stage 1's
    attributes (7.2+), every leaf has the one MemAttr that means so: 0x7 with FWB, 0xF without;
    and there the hyp text is mapped read-only (R--) instead of being unmapped."""
    as_s1 = _kv(rules).host_s2_memattr_as_s1
    valid = [leaf for leaf in (_host_s2(snap).leaves) if leaf.valid]
    want_attr = MEMATTR_NORMAL
    if as_s1 and valid and valid[0].memattr in (MEMATTR_NORMAL, MEMATTR_FWB_AS_S1):
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
    for leaf in _host_s2(snap).leaves:
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
    for leaf in _host_s2(snap).leaves:
        if leaf.valid and leaf.state != "OWNED":
            if leaf.state not in ("SHARED_OWNED", "SHARED_BORROWED") or leaf.level != 3:
                yield Finding("s2-page-states", f"host stage-2 leaf {leaf.addr:#x} (level {leaf.level})",
                              "SHARED_OWNED or SHARED_BORROWED on a level-3 page", f"{leaf.state}")


@check("carveout-hyp-owned")
def carveout_hyp_owned(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """§7.14: every page of the hyp carveout, mapped or not, is annotated in the host stage-2 as
    the hyp's (an empty entry would let the host's next access map it); none is mapped for the host."""
    if not snap.carveout:
        raise MissingInput(f"the carveout could not be read: {snap.unavailable.get('carveout')}")
    _host_s2(snap)
    base, size = snap.carveout
    pa = base
    while pa < base + size:
        leaf = snap.host_s2.leaf_at(pa)
        if leaf is None:
            yield Finding("carveout-hyp-owned", f"carveout page {pa:#x}", "invalid, owner hyp",
                          "an empty host stage-2 entry: the host's next access would map it")
            pa += PAGE
            continue
        if leaf.valid or leaf.owner != OWNER_HYP:
            yield Finding("carveout-hyp-owned", f"host stage-2 entry {leaf.addr:#x} in the carveout",
                          "invalid, owner hyp", leaf.describe() if hasattr(leaf, "describe") else f"{leaf.pte:#x}")
        pa = leaf.addr + leaf.size          # one finding per entry; its other pages are the same


@check("vm-table", applies=_absent("vm_table"))
def vm_table(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """§7.19: handle == 0x1000 + slot, and the VM's stage-2 PGD is the first page of its pool."""
    for vm in getattr(snap, "vms", []):
        if vm.handle is not None and vm.handle != 0x1000 + vm.index:
            yield Finding("vm-table", f"vm_table[{vm.index}]", f"handle {0x1000 + vm.index:#x}", f"{vm.handle:#x}")
        if vm.pool is not None and vm.pgd_phys is not None and vm.pgd_phys != vm.pool.range_start:
            yield Finding("vm-table", f"vm_table[{vm.index}]", f"PGD at its pool start {vm.pool.range_start:#x}",
                          f"{vm.pgd_phys:#x}")


# --- page states in the hyp vmemmap, and each VM's stage-2 at EL2 (6.14+) ---------------------
OWNED, SHARED_OWNED, SHARED_BORROWED, NOPAGE = (STATE_CODES[s] for s in State)
GUEST_S2_STATES = {"OWNED": "donated", "SHARED_OWNED": "shared back with the host",
                   "SHARED_BORROWED": "shared by the host"}


def _page_states_apply(snap: Any, rules: VersionRules) -> str | None:
    """Where the page states are not in the vmemmap (before 6.14), or a hand-built snapshot
    carries none. One that could not be read is not excused: see _states."""
    absent = getattr(snap, "absent", {}).get("page_states")
    if absent or getattr(snap, "page_states", None) is not None or "page_states" in getattr(snap, "unavailable", {}):
        return absent
    return "the snapshot carries no page states"


def _states(snap: Any) -> dict[int, tuple[int, int, int]]:
    if snap.page_states is None:
        raise MissingInput(f"the page states could not be read: {snap.unavailable.get('page_states')}")
    return snap.page_states


def _state(snap: Any, pa: int) -> tuple[int, int, int]:
    return _states(snap).get(pa, DEFAULT_VMEMMAP_STATE)


_name = state_name


def _pages(leaf: Any) -> Iterable[tuple[int, int]]:
    """(input address, PA) of every page of a valid leaf."""
    for off in range(0, leaf.size, PAGE):
        yield leaf.addr + off, leaf.pa + off


def _guest_mappings(snap: Any) -> Iterable[tuple[Any, int, int, str]]:
    """(VM, IPA, PA, state) of every page every VM's stage-2 at EL2 maps."""
    for vm in getattr(snap, "vms", []):
        for leaf in vm.s2.leaves if getattr(vm, "s2", None) else []:
            if leaf.valid:
                for ipa, pa in _pages(leaf):
                    yield vm, ipa, pa, leaf.state


def _in_text(snap: Any, pa: int) -> bool:
    text = getattr(snap, "hyp_text", None)
    return bool(text and text[0] <= pa < text[1])


@check("hyp-s1-permissions")
def hyp_s1_permissions(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """§7.16: no hyp stage-1 mapping is both writable and executable, only the hyp text is mapped
    executable, and every mapping of the hyp text is read-only (hyp_set_prot_attr's own rules:
    AP[2] read-only; XN in bit 54, and from 7.x in hVHE PXN in bit 53 too: a leaf executes at EL2
    only with both clear)."""
    _hyp_s1(snap)
    if getattr(snap, "hyp_text", None) is None:
        raise MissingInput(f"the hyp text's range could not be read: {snap.unavailable.get('hyp_text')}")
    for leaf in snap.hyp_s1.leaves:
        if not leaf.valid:
            continue
        writable, executable = not leaf.pte & (1 << 7), not leaf.pte & (3 << 53)
        where = f"hyp VA {leaf.addr:#x} (PA {leaf.pa:#x}, {leaf.size:#x} bytes)"
        text = [_in_text(snap, pa) for pa in range(leaf.pa, leaf.pa + leaf.size, PAGE)]
        if writable and executable:
            yield Finding("hyp-s1-permissions", where, "writable or executable, not both", "writable and executable")
        elif executable and not all(text):
            yield Finding("hyp-s1-permissions", where, "executable only if it maps the hyp text",
                          "executable, mapping pages outside the hyp text")
        elif writable and any(text):
            yield Finding("hyp-s1-permissions", where, "the hyp text mapped read-only", "writable")


@check("hyp-s1-pages")
def hyp_s1_pages(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """§7.15: every memory page the hyp maps (its linear map or private range) is one it owns or
    borrows, and the host agrees: a page the hyp owns is NOPAGE for the host (annotated in its
    stage-2), a page it borrows is the host's SHARED_OWNED. The hyp's state is the mapping's
    software bits, or from 6.14 the vmemmap's; the host's is its stage-2, or the vmemmap's. Before
    6.14 also: every page the host shares is mapped borrowed in the hyp's linear map (no guest
    shares memory at EL2 then; FF-A shares are not made on QEMU). Before 6.12 the hyp's stack
    pages are the host's (KernelVersion.hyp_stacks_owned_by_hyp): not reported there."""
    _host_s2(snap)
    _hyp_s1(snap)
    vmemmap = getattr(snap, "page_states", None) is not None
    if not vmemmap and "page_states" in getattr(snap, "unavailable", {}):
        raise MissingInput(f"the page states could not be read: {snap.unavailable['page_states']}")
    if getattr(snap, "hyp_physvirt_offset", None) is None:
        raise MissingInput("hyp_physvirt_offset could not be read: the hyp's linear map is not known")
    borrowed: set[int] = set()
    for leaf in snap.hyp_s1.leaves:
        if not leaf.valid or _in_memblock(snap, leaf.pa, leaf.pa + leaf.size) is False:
            continue
        linear = in_hyp_linear_map(leaf, snap.hyp_physvirt_offset)
        for va, pa in _pages(leaf):
            if not _in_memblock(snap, pa, pa + PAGE):    # a block across a region edge: its pages one by one
                continue
            hyp = _name(_state(snap, pa)[1]) if vmemmap else leaf.state or "OWNED"
            host = snap.host_state(pa)
            want = {"OWNED": "NOPAGE", "SHARED_BORROWED": "SHARED_OWNED", "SHARED_OWNED": "SHARED_BORROWED"}.get(hyp)
            if hyp == "SHARED_BORROWED" and linear:
                borrowed.add(pa)
            if not linear and hyp == "OWNED" and host == "OWNED" and not _kv(rules).hyp_stacks_owned_by_hyp:
                break                       # a stack page this kernel leaves to the host (version fact)
            if want is None or host != want:
                yield Finding("hyp-s1-pages", f"hyp VA {va:#x} -> page {pa:#x} (hyp {hyp})",
                              f"a page the hyp owns or borrows: host {want or 'NOPAGE or SHARED_OWNED'}",
                              f"host {host}")
                break                       # one finding per hyp mapping
    if vmemmap:
        return                              # page-state-pairs: what the host shares, someone borrows
    for leaf in snap.host_s2.leaves:
        if leaf.valid and leaf.state == "SHARED_OWNED":
            for pa in range(leaf.addr, leaf.addr + leaf.size, PAGE):
                if pa not in borrowed:
                    yield Finding("hyp-s1-pages", f"page {pa:#x} (host SHARED_OWNED)",
                                  "mapped SHARED_BORROWED in the hyp's linear map", "not mapped so")


@check("page-state-pairs", applies=_page_states_apply)
def page_state_pairs(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """Every vmemmap entry encodes a possible state, for the host and (through its complement)
    for the hyp, and the two agree: what one owns and shares the other borrows; a page the hyp
    owns the host has not; a page the host shares with guests counts them."""
    shared_back = {pa for _, _, pa, state in _guest_mappings(snap) if state == "SHARED_OWNED"}
    for pa, (host, hyp, count) in sorted(_states(snap).items()):
        where = f"page {pa:#x} (host {_name(host)}, hyp {_name(hyp)}, guests {count})"
        if host not in STATE_OF_CODE or hyp not in STATE_OF_CODE:
            yield Finding("page-state-pairs", where, "host and hyp states each OWNED, SHARED_OWNED, "
                          "SHARED_BORROWED or NOPAGE", "an encoding no transition writes")
            continue
        want = {OWNED: {NOPAGE}, SHARED_OWNED: {SHARED_BORROWED}, SHARED_BORROWED: {SHARED_OWNED}}.get(hyp)
        if want is not None and host not in want:
            yield Finding("page-state-pairs", where, f"host {_name(next(iter(want)))} when the hyp is {_name(hyp)}",
                          f"host {_name(host)}")
        if host == SHARED_OWNED and hyp != SHARED_BORROWED and not count:
            yield Finding("page-state-pairs", where, "a host-shared page borrowed by the hyp or shared with a guest",
                          "borrowed by nobody")
        if count and host != SHARED_OWNED:
            yield Finding("page-state-pairs", where, "host SHARED_OWNED for a page shared with guests",
                          f"host {_name(host)}")
        if host == SHARED_BORROWED and hyp != SHARED_OWNED and pa not in shared_back:
            yield Finding("page-state-pairs", where, "a page the host borrows is shared by the hyp or by a guest",
                          "shared by nobody")


@check("page-state-host-s2", applies=_page_states_apply)
def page_state_host_s2(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """The host's vmemmap state agrees with the host stage-2: a page donated away (annotated
    invalid) is NOPAGE for the host; a NOPAGE page is annotated (an empty entry would let the
    host's next fault map it), or is the hyp text the host maps read-only."""
    _host_s2(snap)
    for leaf in snap.host_s2.leaves:
        if not leaf.valid and leaf.owner is not None:
            for pa in range(leaf.addr, leaf.addr + leaf.size, PAGE):
                host = _state(snap, pa)[0]
                if host != NOPAGE:
                    yield Finding("page-state-host-s2", f"page {pa:#x}", "host NOPAGE where the host stage-2 "
                                  f"annotates it ({leaf.describe()})", f"host {_name(host)}")
    for pa, (host, _, _) in sorted(_states(snap).items()):
        if host != NOPAGE:
            continue
        leaf = snap.host_s2.leaf_at(pa)
        if leaf is None:
            yield Finding("page-state-host-s2", f"page {pa:#x} (host NOPAGE)", "annotated in the host stage-2",
                          "an empty entry: the host's next access would map it")
        elif leaf.valid and not (_kv(rules).host_maps_hyp_text_read_only and _in_text(snap, pa)):
            yield Finding("page-state-host-s2", f"page {pa:#x} (host NOPAGE)", "not mapped for the host",
                          f"mapped by leaf {leaf.addr:#x}+{leaf.size:#x} {leaf.describe()}")


@check("page-state-hyp-s1", applies=_page_states_apply)
def page_state_hyp_s1(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """The hyp's vmemmap state agrees with its stage-1: every memory page the hyp maps (in its
    linear map or its private range: stacks, the vmemmap) it owns, shares or borrows; every page
    it owns is mapped."""
    _hyp_s1(snap)
    mapped: dict[int, int] = {}         # PA -> a hyp VA mapping it
    for leaf in snap.hyp_s1.leaves:
        if leaf.valid and _in_memblock(snap, leaf.pa, leaf.pa + leaf.size):
            for va, pa in _pages(leaf):
                mapped.setdefault(pa, va)
    states = _states(snap)
    for pa in sorted(mapped):
        hyp = _state(snap, pa)[1]
        if hyp == NOPAGE:
            yield Finding("page-state-hyp-s1", f"page {pa:#x} (hyp VA {mapped[pa]:#x})",
                          "hyp OWNED, SHARED_OWNED or SHARED_BORROWED where the hyp maps it", "hyp NOPAGE")
    for pa, (_, hyp, _) in sorted(states.items()):
        if hyp == OWNED and pa not in mapped:
            yield Finding("page-state-hyp-s1", f"page {pa:#x} (hyp OWNED)", "mapped in the hyp stage-1", "not mapped")


@check("guest-share-count", applies=_page_states_apply)
def guest_share_count(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """A page's host_share_guest_count is the number of guest stage-2 mappings of it that the
    host shared (SHARED_BORROWED in the guest's stage-2 at EL2)."""
    mapped: dict[int, list[str]] = {}
    for vm, ipa, pa, state in _guest_mappings(snap):
        if state == "SHARED_BORROWED":
            mapped.setdefault(pa, []).append(f"VM {vm.handle:#x} IPA {ipa:#x}")
    counted = {pa for pa, (_, _, count) in _states(snap).items() if count}
    for pa in sorted(counted | set(mapped)):
        count, where = _state(snap, pa)[2], mapped.get(pa, [])
        if count != len(where):
            yield Finding("guest-share-count", f"page {pa:#x}", f"host_share_guest_count {len(where)} "
                          f"({', '.join(where) or 'no guest maps it'})", f"{count}")


@check("vm-s2-pages", applies=_page_states_apply)
def vm_s2_pages(snap: Any, rules: VersionRules) -> Iterable[Finding]:
    """Each VM's stage-2 at EL2 maps only memory the host shared with or donated to that VM
    (a donation is annotated in the host stage-2 with the VM's handle and the page's gfn), and
    its table pages belong to the hyp."""
    for vm, ipa, pa, state in _guest_mappings(snap):
        where = f"VM {vm.handle:#x} IPA {ipa:#x} -> {pa:#x} ({GUEST_S2_STATES.get(state, state)})"
        host = _state(snap, pa)[0]
        if not _in_memblock(snap, pa, pa + PAGE):
            yield Finding("vm-s2-pages", where, "a page of memory", "not memory")
        elif state == "SHARED_BORROWED" and host != SHARED_OWNED:
            yield Finding("vm-s2-pages", where, "host SHARED_OWNED", f"host {_name(host)}")
        elif state == "SHARED_OWNED" and host != SHARED_BORROWED:
            yield Finding("vm-s2-pages", where, "host SHARED_BORROWED", f"host {_name(host)}")
        elif state == "OWNED":
            leaf = snap.host_s2.leaf_at(pa) if snap.host_s2 else None
            donated = leaf.donated_to if leaf is not None else None
            if host != NOPAGE or donated != (vm.handle, ipa // PAGE):
                annotated = leaf.describe() if leaf is not None else "empty"
                if donated is not None:
                    annotated += f" to VM {donated[0]:#x} gfn {donated[1]:#x}"
                yield Finding("vm-s2-pages", where, f"host NOPAGE, annotated as donated to VM {vm.handle:#x} "
                              f"gfn {ipa // PAGE:#x}", f"host {_name(host)}, host stage-2 {annotated}")
        elif state not in GUEST_S2_STATES:
            yield Finding("vm-s2-pages", where, "OWNED, SHARED_OWNED or SHARED_BORROWED", f"{state}")
    for vm in getattr(snap, "vms", []):
        for table, _ in vm.s2.tables if getattr(vm, "s2", None) else []:
            host, hyp, _ = _state(snap, table)
            if (host, hyp) != (NOPAGE, OWNED):
                yield Finding("vm-s2-pages", f"VM {vm.handle:#x} stage-2 table page {table:#x}",
                              "hyp OWNED, host NOPAGE", f"hyp {_name(hyp)}, host {_name(host)}")
