"""Reference model of the pKVM EL2 buddy allocator (arch/arm64/kvm/hyp/nvhe/page_alloc.c).

Pure Python, no I/O. It reproduces the kernel's observable state exactly: every
``struct hyp_page`` (refcount, order), every ``free_area[k]`` list in list order
(index 0 == ``free_area[k].next``), the returned addresses, and the BUG()s.

Line numbers "page_alloc.c:N", "memory.h:N", "gfp.h:N" refer to the 6.12 tree
(linux-source-6.12, SUBLEVEL 117, arch/arm64/kvm/hyp/{nvhe,include/nvhe}/).
Other versions were read as patches/trees through the code search; see NOTES.md.

Representation (chosen for speed, see bench/model.py):
  * pages live in flat lists ``_rc`` / ``_ord`` indexed by ``pfn - _org``,
    where ``_org`` is the pool's first PFN rounded down to 2**11 pages.
    Because ``_org`` has 11 zero low bits, the buddy of index i at order
    k <= 10 is simply ``i ^ (1 << k)`` (page_alloc.c:37-39 XORs the absolute
    physical address).
  * the free lists are what the kernel has: circular doubly linked lists.
    ``_nx[i]`` / ``_pv[i]`` are page i's node (next/prev; ``_nx[i] == -1``
    when the node is on no list), and index ``_heads + k`` is the list head
    ``free_area[k]``.  list_add_tail, __list_del_entry and ``.next`` are O(1)
    and unlinking works from whatever list holds the node, as in C.  (A dict
    used as an ordered set looks O(1) too, but CPython must skip the holes
    left by deletions at its front, so ``next(iter(d))`` on a FIFO degrades
    to O(list length).)
  * 'external' pages (6.2+: pages outside [range_start, range_end) freed into
    the pool, such as a VM pool's pages from the host's memcache) enter by
    ``admit()`` and take the indices after the list heads, ``_xbase`` on, in
    the same four arrays; ``_ext`` maps their PFN to that index.  The hot paths
    only look them up once an index falls outside the pool's own pages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from harness.kernel.version import MODEL_REFERENCE, KernelVersion, VersionLike

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1
_IDX_ALIGN = 1 << 11        # index origin alignment: covers every order <= 10
_MAX_NR_PAGES = (1 << 31) - 1   # hyp_pool_init's `int i` loop (page_alloc.c:228,240)

PageSource = Mapping[int, tuple[int, int]] | Callable[[int], tuple[int, int]]


class BuddyBug(Exception):
    """The hypervisor would BUG()/panic here (or hit undefined behaviour).

    ``check`` is the kernel check (quoted from the source) or, for states the
    kernel does not check, a description starting with "no kernel check".
    ``function`` is where it fires.  After a BuddyBug the pool should be
    discarded, like the hypervisor after a hyp_panic: simple checks are made
    before any state changes, but corrupted-state paths may have mutated it.
    """

    def __init__(self, check: str, function: str, detail: str) -> None:
        self.check = check
        self.function = function
        self.detail = detail
        super().__init__(f"{check} in {function}: {detail}")


# --------------------------------------------------------------------------- version rules


@dataclass(frozen=True)
class VersionRules:
    """One rule set of the allocator, as a kernel release range implements it."""

    name: str                    # "5.13", "5.14", "5.15", "5.17+", "6.2+", "6.4+", "6.14+", "7.2+"
    requested: str               # the version string asked for
    covers: str                  # which releases this rule set describes
    max_order_formula: str       # C expression from hyp_pool_init
    plus_one: bool               # get_order((nr_pages + 1) << PAGE_SHIFT)  (~5.17 .. 6.3)
    inclusive: bool              # loops use <= max_order (6.4+) instead of < max_order
    arch_max_order: int          # MAX_ORDER (11, exclusive) / MAX_PAGE_ORDER (10, inclusive), 4K pages
    nr_free_areas: int           # entries of hyp_pool.free_area[]
    order_type: str
    order_bits: int
    hyp_no_order: int            # HYP_NO_ORDER
    refcount_type: str
    refcount_bits: int
    availability: str            # how __find_buddy_avail tells a free buddy
    external_pages: bool         # __hyp_attach_page: `goto insert` for phys outside the range (6.2+)
    has_split: bool              # hyp_split_page() exists
    inc_check: str | None     # check in hyp_page_ref_inc, None = silently wraps
    dec_check: str | None     # check on the put path, None = silently wraps
    dec_function: str
    set_refcounted_check: str
    helpers_file: str            # where the refcount helpers live
    init_refcounts: bool         # init sets refcount 1 and frees with __hyp_put_page (5.14+)
    node_in_page: bool           # free-list node stored in the free page (5.14+), not in hyp_page
    external_order_zero: bool = False   # __hyp_attach_page frees an external page at order 0 (7.2+)
    init_resets_order: bool = False     # hyp_pool_init sets p->order = 0 on every page (7.2+)
    warning: str | None = None

    @property
    def refcount_max(self) -> int:
        return (1 << self.refcount_bits) - 1

    def max_order(self, nr_pages: int) -> int:
        """pool->max_order exactly as hyp_pool_init computes it (page_alloc.c:231-232).

        ``nr_pages`` is `unsigned int`, so ``nr_pages << PAGE_SHIFT`` is a 32-bit
        shift: it wraps for pools of >= 4 GiB (2**20 pages) before get_order().
        """
        n = (nr_pages + 1 if self.plus_one else nr_pages) & _U32
        return min(self.arch_max_order, get_order((n << PAGE_SHIFT) & _U32))

    def range_bytes(self, nr_pages: int) -> int:
        """``nr_pages << PAGE_SHIFT`` as used for range_end (page_alloc.c:236): also 32-bit."""
        return (nr_pages << PAGE_SHIFT) & _U32

    def initialised_lists(self, max_order: int) -> int:
        """How many free_area[] heads hyp_pool_init INIT_LIST_HEADs (page_alloc.c:233-234)."""
        return max_order + 1 if self.inclusive else max_order


def get_order(size: int) -> int:
    """include/asm-generic/getorder.h:41-47, the non-constant path used at run time.

    fls64((size - 1) >> PAGE_SHIFT) on unsigned long: get_order(0) == 52.
    """
    return (((size - 1) & _U64) >> PAGE_SHIFT).bit_length()


def _base_rules() -> dict[str, dict]:
    excl = dict(inclusive=False, arch_max_order=11, nr_free_areas=11)
    ushort = dict(order_type="unsigned short", order_bits=16, hyp_no_order=0xFFFF,
                  refcount_type="unsigned short", refcount_bits=16,
                  availability="buddy->order == order && !buddy->refcount")
    inc = "BUG_ON(p->refcount == USHRT_MAX)"
    dec = "BUG_ON(!p->refcount)"
    setrc = "BUG_ON(p->refcount)"
    pre617 = "min(MAX_ORDER, get_order(nr_pages << PAGE_SHIFT))"
    p1 = "min(MAX_ORDER, get_order((nr_pages + 1) << PAGE_SHIFT))"
    incl = "min(MAX_PAGE_ORDER, get_order(nr_pages << PAGE_SHIFT))"
    rules: dict[str, dict] = {
        "5.13": dict(
            covers="5.13 (first merge, 'KVM: arm64: Introduce a Hyp buddy page allocator')",
            max_order_formula=pre617, plus_one=False, **excl,
            order_type="unsigned int", order_bits=32, hyp_no_order=_U32,
            refcount_type="unsigned int", refcount_bits=32,
            availability="buddy->order == order && !list_empty(&buddy->node)",
            external_pages=False, has_split=False, inc_check=None, dec_check=None,
            dec_function="hyp_page_ref_dec_and_test",
            set_refcounted_check="if (p->refcount) { hyp_spin_unlock(&pool->lock); BUG(); }",
            helpers_file="nvhe/gfp.h", init_refcounts=False, node_in_page=False),
        "5.14": dict(
            covers="5.14.0 .. 5.14.14 ('Reduce hyp_vmemmap overhead' series)",
            max_order_formula=pre617, plus_one=False, **excl, **ushort,
            external_pages=False, has_split=False, inc_check=inc, dec_check=None,
            dec_function="hyp_page_ref_dec_and_test", set_refcounted_check=setrc,
            helpers_file="nvhe/page_alloc.c", init_refcounts=True, node_in_page=True),
        "5.15": dict(
            covers="5.15, 5.16 (and 5.14.15+ stable): hyp_split_page + 'Report corrupted refcount at EL2'",
            max_order_formula=pre617, plus_one=False, **excl, **ushort,
            external_pages=False, has_split=True, inc_check=inc, dec_check=dec,
            dec_function="hyp_page_ref_dec_and_test", set_refcounted_check=setrc,
            helpers_file="nvhe/page_alloc.c", init_refcounts=True, node_in_page=True),
        "5.17+": dict(
            covers="5.17 .. 6.1 ('KVM: arm64: pkvm: Fix hyp_pool max order')",
            max_order_formula=p1, plus_one=True, **excl, **ushort,
            external_pages=False, has_split=True, inc_check=inc, dec_check=dec,
            dec_function="hyp_page_ref_dec_and_test", set_refcounted_check=setrc,
            helpers_file="nvhe/page_alloc.c", init_refcounts=True, node_in_page=True),
        "6.2+": dict(
            covers="6.2, 6.3 (non-coalescable 'external' pages; helpers moved to memory.h)",
            max_order_formula=p1, plus_one=True, **excl, **ushort,
            external_pages=True, has_split=True, inc_check=inc, dec_check=dec,
            dec_function="hyp_page_ref_dec", set_refcounted_check=setrc,
            helpers_file="nvhe/memory.h", init_refcounts=True, node_in_page=True),
        "6.4+": dict(
            covers="6.4 .. 6.13 (MAX_ORDER made inclusive; 6.8 renamed it MAX_PAGE_ORDER)",
            max_order_formula=incl, plus_one=False, inclusive=True, arch_max_order=10,
            nr_free_areas=11, **ushort,
            external_pages=True, has_split=True, inc_check=inc, dec_check=dec,
            dec_function="hyp_page_ref_dec", set_refcounted_check=setrc,
            helpers_file="nvhe/memory.h", init_refcounts=True, node_in_page=True),
        "6.14+": dict(
            covers="6.14 .. 6.17 read, 6.18 .. 7.1 assumed (u8 order, HYP_NO_ORDER 0xff)",
            max_order_formula=incl, plus_one=False, inclusive=True, arch_max_order=10,
            nr_free_areas=11, order_type="u8", order_bits=8, hyp_no_order=0xFF,
            refcount_type="u16", refcount_bits=16,
            availability="buddy->order == order && !buddy->refcount",
            external_pages=True, has_split=True, inc_check=inc, dec_check=dec,
            dec_function="hyp_page_ref_dec", set_refcounted_check=setrc,
            helpers_file="nvhe/memory.h", init_refcounts=True, node_in_page=True),
    }
    # 7.2 (read in 7.2.13 and 7.3.4): 7.3 page_alloc.c:101-108 forces an external page to order 0
    # (`order = 0; coalesce = false`) and :249-252 sets p[i].order = 0 in hyp_pool_init.
    rules["7.2+"] = dict(rules["6.14+"], covers="7.2, 7.3 read (external pages freed at order 0, "
                         "hyp_pool_init resets p->order)", external_order_zero=True, init_resets_order=True)
    return rules


_RULES = _base_rules()


def version_rules(version: VersionLike) -> VersionRules:
    """The rule set for a kernel version (a KernelVersion, or a string: "6.12", "6.12.117",
    "v6.1.192", "5.15"); which release takes which set is KernelVersion.buddy_rules."""
    kv = KernelVersion.of(version)
    name = kv.buddy_rules
    return VersionRules(name=name, requested=str(version), warning=kv.buddy_rules_warning, **_RULES[name])


# --------------------------------------------------------------------------- the pool


class HypPool:
    """A struct hyp_pool plus the hyp_vmemmap entries of its pages.

    ``range_start``/``range_end``/``max_order`` are the kernel's field values
    (range_end and max_order include the 32-bit truncation, see NOTES.md).
    The model tracks the ``nr_pages`` pages hyp_pool_init initialised,
    ``[range_start, span_end)``; ``span_end == range_end`` unless the pool is
    >= 4 GiB. Under rules with external pages (6.2+) it also tracks the pages
    ``admit()`` brought in from outside the allocator.
    """

    __slots__ = ("rules", "version", "range_start", "range_end", "span_end", "nr_pages",
                 "reserved_pages", "max_order", "top_order",
                 "_org", "_lo", "_rhi", "_shi", "_rc", "_ord", "_nx", "_pv", "_heads", "_ninit",
                 "_no_order", "_rc_max", "_list_avail", "_external", "_order_limit", "_node_in_page",
                 "_ext_zero", "_xbase", "_ext", "_ext_pfn")

    reserved_pages: int | None

    def __init__(self, range_start: int, nr_pages: int, reserved_pages: int = 0,
                 version: VersionLike = MODEL_REFERENCE) -> None:
        if reserved_pages < 0:
            raise ValueError("reserved_pages must be >= 0")
        self._setup(version_rules(version), range_start, nr_pages, None)
        self.reserved_pages = reserved_pages
        self._init_vmemmap(reserved_pages)

    # ---- construction

    def _setup(self, rules: VersionRules, range_start: int, nr_pages: int,
               max_order: int | None) -> None:
        """The struct hyp_pool fields hyp_pool_init sets (page_alloc.c:231-236), then the arrays."""
        if range_start < 0 or range_start & (PAGE_SIZE - 1):
            raise ValueError(f"range_start {range_start:#x} must be a page-aligned physical address")
        if not 0 <= nr_pages <= _MAX_NR_PAGES:
            raise ValueError("nr_pages must be in [0, 2**31): hyp_pool_init loops with `int i`")
        self.rules = rules
        self.version = rules.requested
        self.nr_pages = nr_pages
        self.reserved_pages = None    # unknown for a pool built from_state
        self.range_start = range_start
        # :236 phys + (nr_pages << PAGE_SHIFT), the shift being 32-bit.
        self.range_end = range_start + rules.range_bytes(nr_pages)
        self.span_end = range_start + (nr_pages << PAGE_SHIFT)
        mo = rules.max_order(nr_pages) if max_order is None else max_order
        if not 0 <= mo <= rules.arch_max_order:
            raise ValueError(f"max_order {mo} outside [0, {rules.arch_max_order}] for rules {rules.name}")
        self.max_order = mo
        self._ninit = rules.initialised_lists(mo)
        self.top_order = self._ninit - 1          # highest order alloc/coalesce can reach
        self._no_order = rules.hyp_no_order
        self._rc_max = rules.refcount_max
        self._list_avail = rules.availability.find("list_empty") >= 0
        self._external = rules.external_pages
        self._ext_zero = rules.external_order_zero
        self._order_limit = (1 << rules.order_bits) - 1
        self._node_in_page = rules.node_in_page
        self._setup_arrays()

    def _setup_arrays(self) -> None:
        """Zeroed hyp_page entries for the pool's pages, and free_area[] heads (INIT_LIST_HEAD)."""
        base = self.range_start >> PAGE_SHIFT
        self._lo = base & (_IDX_ALIGN - 1)
        self._org = base - self._lo
        self._rhi = self._lo + ((self.range_end - self.range_start) >> PAGE_SHIFT)
        self._shi = size = self._lo + self.nr_pages
        # list nodes: pages first, then one self-linked head per free_area[] entry, then the
        # admitted external pages; _rc/_ord entries at the heads' indices are unused padding.
        self._heads = size
        self._xbase = xbase = size + self.rules.nr_free_areas
        self._rc = [0] * xbase
        self._ord = [0] * xbase
        heads = range(size, xbase)
        self._nx = [-1] * size + list(heads)
        self._pv = [-1] * size + list(heads)
        self._ext: dict[int, int] = {}          # admitted external page: pfn -> index
        self._ext_pfn: list[int] = []           # index - _xbase -> pfn

    def _init_vmemmap(self, reserved: int) -> None:
        """hyp_pool_init's page loops (page_alloc.c:238-245), ascending, through the attach path.

        The model's vmemmap starts zeroed, so every page's order is 0 when attached. 7.2+
        (init_resets_order) makes sure of it: 7.3 page_alloc.c:249-252 sets p[i].order = 0. Before,
        hyp_pool_init attaches each page at whatever order its hyp_page held (stale for pages
        that were in another pool), which the model does not represent.
        """
        lo, shi = self._lo, self._shi
        first_free = min(lo + reserved, shi)
        rc, attach = self._rc, self._attach
        if self.rules.init_refcounts:
            # :240-241 hyp_set_page_refcounted() on every page (fresh vmemmap: 0 -> 1), then
            # :244-245 __hyp_put_page() on the unreserved ones, ascending: 1 -> 0, attach.
            rc[lo:shi] = [1] * (shi - lo)
            for i in range(first_free, shi):
                rc[i] = 0
                attach(i)
        else:
            # 5.13: memset(p, 0) + INIT_LIST_HEAD, then __hyp_attach_page(): refcount stays 0.
            for i in range(first_free, shi):
                attach(i)

    @classmethod
    def from_state(cls, range_start: int, nr_pages: int, pages: PageSource,
                   free_lists: Mapping[int, list[int]], version: VersionLike = MODEL_REFERENCE,
                   max_order: int | None = None, external: Iterable[int] = ()) -> HypPool:
        """Start from an observed snapshot.

        ``pages`` maps (or is called with) each physical page address in
        ``[range_start, range_start + nr_pages*4096)`` to (refcount, order).
        ``free_lists`` maps order -> addresses in list order (index 0 == .next).
        Under rules with external pages (6.2+), a list entry outside those pages
        is an 'external' page: it is admitted with its (refcount, order) from
        ``pages``, as are the pages in ``external`` (admitted pages on no list,
        which snapshot() names).
        The snapshot may be inconsistent (that is what a checker wants to feed
        in); only what the model cannot represent is rejected: list entries
        outside the tracked pages before 6.2, duplicated entries, or lists the
        kernel never initialised.
        """
        self = cls.__new__(cls)
        self._setup(version_rules(version), range_start, nr_pages, max_order)
        lookup = pages if callable(pages) else pages.__getitem__
        self._load_pages(lookup)
        for pa in external:
            self._admit_from(lookup, pa)
        self._load_lists(lookup, free_lists)
        return self

    def _load_pages(self, lookup: Callable[[int], tuple[int, int]]) -> None:
        rc_max, ord_max = self._rc_max, self._order_limit
        for i in range(self._lo, self._shi):
            pa = self._pa(i)
            try:
                rc, order = lookup(pa)
            except KeyError:
                raise ValueError(f"from_state: no (refcount, order) for page {pa:#x}") from None
            if not (0 <= rc <= rc_max and 0 <= order <= ord_max):
                raise ValueError(f"from_state: page {pa:#x} ({rc}, {order}) does not fit "
                                 f"{self.rules.refcount_type}/{self.rules.order_type}")
            self._rc[i] = rc
            self._ord[i] = order

    def _admit_from(self, lookup: Callable[[int], tuple[int, int]], pa: int) -> int:
        try:
            rc, order = lookup(pa)
        except KeyError:
            raise ValueError(f"from_state: no (refcount, order) for external page {pa:#x}") from None
        return self._admit(pa, rc, order, "from_state")

    def _load_lists(self, lookup: Callable[[int], tuple[int, int]],
                    free_lists: Mapping[int, list[int]]) -> None:
        for k, addrs in sorted(free_lists.items()):
            if not addrs:
                continue
            if not 0 <= k < self._ninit:
                raise ValueError(f"from_state: free_area[{k}] is not initialised for max_order "
                                 f"{self.max_order} ({self.rules.name})")
            for pa in addrs:
                if pa < 0 or pa & (PAGE_SIZE - 1):
                    raise ValueError(f"from_state: free_area[{k}] entry {pa:#x} is not a page address")
                i = self._lookup(pa)
                if i is None:
                    if not self._external:
                        raise ValueError(f"from_state: free_area[{k}] entry {pa:#x} is not a page of the "
                                         f"pool (rules {self.rules.name} have no external pages)")
                    i = self._admit_from(lookup, pa)
                if self._nx[i] >= 0:
                    raise ValueError(f"from_state: page {pa:#x} listed twice")
                self._link_tail(i, k)

    # ---- external pages (6.2+)

    def admit(self, pa: int, refcount: int, order: int) -> None:
        """An 'external' page enters this pool's accounting from outside the allocator, with the
        refcount and order its struct hyp_page holds.

        guest_s2_zalloc_page(): once the VM's pool is empty, a page popped from the host's
        memcache gets p->refcount = 1 by hand (6.12 mem_protect.c:189-207 zeroes its hyp_page
        first; 7.3 :204-222 does not, so p->order may be stale); guest_s2_get_page() and
        guest_s2_put_page() then call hyp_get_page()/hyp_put_page() on the VM's pool with it,
        and at refcount 0 __hyp_attach_page() frees it into the pool without coalescing, where
        hyp_alloc_pages() may hand it out again. Only for rules with external pages (6.2+); ValueError otherwise,
        for a page this pool already tracks (one of its own, or admitted before), or for values
        that do not fit struct hyp_page.
        """
        self._admit(pa, refcount, order, "admit")

    def _admit(self, pa: int, rc: int, order: int, caller: str) -> int:
        if not self._external:
            raise ValueError(f"{caller}: rules {self.rules.name} have no external pages (before 6.2 "
                             "__hyp_attach_page() treats every page as one of the pool's)")
        if pa < 0 or pa & (PAGE_SIZE - 1):
            raise ValueError(f"{caller}: {pa:#x} is not a page address")
        pfn = pa >> PAGE_SHIFT
        if self._lo <= pfn - self._org < self._shi:
            raise ValueError(f"{caller}: {pa:#x} is a page of the pool [{self.range_start:#x}, "
                             f"{self.span_end:#x}), not an external page")
        if pfn in self._ext:
            raise ValueError(f"{caller}: external page {pa:#x} is already admitted")
        if not (0 <= rc <= self._rc_max and 0 <= order <= self._order_limit):
            raise ValueError(f"{caller}: page {pa:#x} ({rc}, {order}) does not fit "
                             f"{self.rules.refcount_type}/{self.rules.order_type}")
        i = self._xbase + len(self._ext_pfn)
        self._ext[pfn] = i
        self._ext_pfn.append(pfn)
        self._rc.append(rc)
        self._ord.append(order)
        self._nx.append(-1)
        self._pv.append(-1)
        return i

    def _ext_index(self, pa: int, function: str) -> int:
        """The index of an admitted external page (the hot paths' fallback), or the BuddyBug."""
        i = self._ext.get(pa >> PAGE_SHIFT)
        if i is None:
            raise self._untracked(function, pa)
        return i

    def is_tracked(self, pa: int) -> bool:
        """Whether the model holds a struct hyp_page for the page at ``pa``: one of the pool's
        pages ``[range_start, span_end)``, or an admitted external page."""
        return self._lookup(pa) is not None

    def external_pages(self) -> list[int]:
        """The admitted external pages' addresses, in the order they were admitted."""
        return [pfn << PAGE_SHIFT for pfn in self._ext_pfn]

    # ---- address helpers

    def _lookup(self, pa: int) -> int | None:
        """The index of the tracked page holding ``pa`` (the pool's or an admitted one), or None."""
        i = (pa >> PAGE_SHIFT) - self._org
        if self._lo <= i < self._shi:
            return i
        return self._ext.get(pa >> PAGE_SHIFT)

    def _pa(self, i: int) -> int:
        if i < self._heads:
            return (i + self._org) << PAGE_SHIFT
        return self._ext_pfn[i - self._xbase] << PAGE_SHIFT

    # ---- struct list_head (only used off the hot paths; those inline the same four stores)

    def _link_tail(self, i: int, k: int) -> None:
        """page_add_to_list(p, &free_area[k]): INIT_LIST_HEAD + list_add_tail (page_alloc.c:80-86)."""
        nx, pv = self._nx, self._pv
        h = self._heads + k
        t = pv[h]
        nx[t] = i
        pv[i] = t
        nx[i] = h
        pv[h] = i

    def _list_of(self, i: int) -> int:
        """The free_area[] index whose list holds page i's node (walks to the head)."""
        nx, heads, hend = self._nx, self._heads, self._xbase
        seen, j = 0, nx[i]
        while not heads <= j < hend and seen <= len(nx):
            j, seen = nx[j], seen + 1
        return j - heads

    def _untracked(self, function: str, pa: int) -> BuddyBug:
        hint = ("" if not self._external else
                " (a page from outside the allocator, e.g. the host's memcache, must be admit()ted)")
        return BuddyBug(
            "no kernel check (hyp_virt_to_page() indexes hyp_vmemmap blindly, memory.h:33)",
            function,
            f"{pa:#x} is outside the pool's pages [{self.range_start:#x}, {self.span_end:#x}) and "
            "was not admitted; the kernel would operate on whatever hyp_page that is, the model "
            f"has no state for it{hint}")

    # ---- kernel BUGs (messages quote the source)

    def _bug_set_refcounted(self, i: int, caller: str) -> BuddyBug:
        r = self.rules
        return BuddyBug(r.set_refcounted_check, f"hyp_set_page_refcounted() ({r.helpers_file}) "
                        f"called from {caller}()",
                        f"page {self._pa(i):#x} has refcount {self._rc[i]}, expected 0")

    def _bug_dec(self, pa: int) -> BuddyBug:
        r = self.rules
        assert r.dec_check is not None      # only called where the rules have the check
        return BuddyBug(r.dec_check, f"{r.dec_function}() ({r.helpers_file}) via hyp_put_page()",
                        f"hyp_put_page({pa:#x}) on a page whose refcount is already 0 "
                        "(double free, a tail page, or a free page)")

    def _bug_inc(self, pa: int) -> BuddyBug:
        r = self.rules
        assert r.inc_check is not None
        return BuddyBug(r.inc_check, f"hyp_page_ref_inc() ({r.helpers_file}) via hyp_get_page()",
                        f"hyp_get_page({pa:#x}) with refcount already {self._rc_max}")

    def _bug_list_add(self, i: int, function: str) -> BuddyBug:
        return BuddyBug(
            "no kernel check: list corruption (list_add_tail of a node already on a free list; "
            "reported by nvhe/list_debug.c only with CONFIG_LIST_HARDENED/DEBUG_LIST)",
            function, f"page {self._pa(i):#x} is still linked on free_area[{self._list_of(i)}]")

    def _bug_list_del(self, i: int, function: str) -> BuddyBug:
        return BuddyBug(
            "no kernel check: __list_del_entry() of a node that is on no list "
            "(NULL dereference, or nvhe/list_debug.c report with CONFIG_LIST_HARDENED)",
            function, f"page {self._pa(i):#x} passes __find_buddy_avail() but is not linked")

    def _bug_bad_insert(self, k: int, function: str) -> BuddyBug:
        if k >= self.rules.nr_free_areas:
            what = (f"order {k} is not a valid order (HYP_NO_ORDER is {self._no_order}): "
                    f"PAGE_SIZE << order and free_area[{k}] (of {self.rules.nr_free_areas}) are out "
                    "of range, undefined behaviour")
        else:
            what = (f"free_area[{k}] was never initialised by hyp_pool_init (it only "
                    f"INIT_LIST_HEADs {self._ninit} list(s) for max_order {self.max_order})")
        return BuddyBug("no kernel check: list_add_tail() on an invalid list head", function, what)

    # ---- __hyp_attach_page (page_alloc.c:93-128)

    def _attach(self, p: int) -> None:
        ord_ = self._ord
        k = ord_[p]
        rlo, rhi = self._lo, self._rhi
        # page_alloc.c:103-104 (6.2+): 'external' pages skip coalescing entirely (admitted pages
        # have indices past the heads, so they fail the range test too).
        coalesce = rlo <= p < rhi or not self._external
        if not coalesce and self._ext_zero:     # 7.2+ (7.3 page_alloc.c:105-108): order = 0
            k = 0
        if k >= self.rules.nr_free_areas:       # memset(PAGE_SIZE << order) and free_area[order]
            raise self._bug_bad_insert(k, "__hyp_attach_page()")
        if self._node_in_page and (k or self._nx[p] >= 0):
            self._check_memset(p, k)
        if coalesce:
            ord_[p] = self._no_order            # page_alloc.c:112: p may stop being the head
            top = self.top_order                # (order + 1) <= max_order, or < for pre-6.4
            if k < top:
                k, p = self._coalesce(p, k, top, rlo, rhi)
        if k >= self._ninit:
            raise self._bug_bad_insert(k, "__hyp_attach_page()")
        nx, pv = self._nx, self._pv
        # Only the final head is linked (:127). 5.13 keeps the node in struct hyp_page: a page
        # freed while still linked corrupts the list only if it ends up the head; merged into a
        # lower buddy, its node just stays on its old list (a stale HYP_NO_ORDER entry).
        if nx[p] >= 0:
            raise self._bug_list_add(p, "__hyp_attach_page()")
        ord_[p] = k                             # page_alloc.c:126-127, list_add_tail
        h = self._heads + k
        t = pv[h]
        nx[t] = p
        pv[p] = t
        nx[p] = h
        pv[h] = p

    def _check_memset(self, p: int, k: int) -> None:
        """5.14+: :100 zeroes the 2**k freed pages, and a free page holds its list node.

        A page in there that is still linked on a free list (get() on a free page, then put())
        has its node wiped while its neighbours still point at it: the list is corrupt.
        """
        nx = self._nx
        end = p + (1 << k)
        if p < self._heads and end <= self._shi:
            if not (nx[p] >= 0 or (k and max(nx[p + 1:end], default=-1) >= 0)):
                return
            linked = next(i for i in range(p, end) if nx[i] >= 0)
        else:
            # An external page, or a block reaching past the pool's pages: walk the 2**k pages by
            # address; those the model does not track hold no node it knows of.
            base = self._pa(p)
            found = (self._lookup(base + (j << PAGE_SHIFT)) for j in range(1 << k))
            hit = next((i for i in found if i is not None and nx[i] >= 0), None)
            if hit is None:
                return
            linked = hit
        raise BuddyBug(
            "no kernel check: list corruption (memset() at page_alloc.c:100 zeroes the list "
            "node of a page that is still on a free list)", "__hyp_attach_page()",
            f"page {self._pa(linked):#x} is linked on free_area[{self._list_of(linked)}]")

    def _coalesce(self, p: int, k: int, top: int, rlo: int, rhi: int) -> tuple[int, int]:
        """The loop at page_alloc.c:113-122; returns (final order, final head)."""
        ord_, rc, nx, pv = self._ord, self._rc, self._nx, self._pv
        no_order, list_avail = self._no_order, self._list_avail
        while k < top:
            b = p ^ (1 << k)                    # __find_buddy_nocheck, page_alloc.c:37-48
            if b < rlo or b >= rhi or ord_[b] != k:
                break
            c = nx[b]
            if list_avail:                      # 5.13: !list_empty(&buddy->node)
                if c < 0:
                    break
            elif rc[b]:                         # 5.14+: !buddy->refcount (page_alloc.c:58)
                break
            elif c < 0:
                raise self._bug_list_del(b, "__hyp_attach_page()")
            a = pv[b]                           # page_remove_from_list(buddy), :119
            nx[a] = c
            pv[c] = a
            nx[b] = -1
            ord_[b] = no_order                  # :120
            if b < p:                           # :121 p = min(p, buddy)
                p = b
            k += 1
        return k, p

    # ---- hyp_alloc_pages (page_alloc.c:198-221) / __hyp_extract_page (:130-151)

    def alloc(self, order: int) -> int | None:
        """hyp_alloc_pages(pool, order): the block's physical address, or None for NULL."""
        if not 0 <= order <= self._order_limit:
            raise ValueError(f"order {order} does not fit {self.rules.order_type}")
        nx = self._nx
        h = self._heads + order
        hend = self._heads + self._ninit
        while h < hend:                         # :206-207, smallest non-empty list >= order
            p = nx[h]                           # :214 free_area[i].next, the oldest insertion
            if p != h:
                break
            h += 1
        else:
            return None                         # :208-211
        rc = self._rc
        pv = self._pv
        a, c = pv[p], nx[p]                     # :136 page_remove_from_list(p)
        nx[a] = c
        pv[c] = a
        nx[p] = -1
        k = self._ord[p]
        if k > order:
            self._split_off(p, k, order)        # a split that cannot find its buddy dies first
        if rc[p]:                               # :217 hyp_set_page_refcounted
            raise self._bug_set_refcounted(p, "hyp_alloc_pages")
        rc[p] = 1
        if p < self._heads:
            return (p + self._org) << PAGE_SHIFT
        return self._ext_pfn[p - self._xbase] << PAGE_SHIFT

    def _split_off(self, p: int, k: int, order: int) -> None:
        """__hyp_extract_page's loop (:137-148): keep the lower half, append the upper halves."""
        if k >= self.rules.nr_free_areas:
            raise BuddyBug("no kernel check: undefined behaviour", "__hyp_extract_page()",
                           f"page {self._pa(p):#x} has order {k}: PAGE_SIZE << {k - 1} and "
                           f"free_area[{k - 1}] are out of range")
        if p >= self._heads:
            self._split_off_external(p, k, order)
            return
        ord_, nx, pv, heads = self._ord, self._nx, self._pv, self._heads
        rlo, rhi = self._lo, self._rhi
        while k > order:
            k -= 1
            b = p ^ (1 << k)                    # :145 __find_buddy_nocheck(pool, p, p->order)
            if b < rlo or b >= rhi:
                raise BuddyBug("no kernel check: NULL dereference", "__hyp_extract_page()",
                               f"__find_buddy_nocheck({self._pa(p):#x}, {k}) returned NULL "
                               "(block not inside the pool range) and :146 writes buddy->order")
            if nx[b] >= 0:
                raise self._bug_list_add(b, "__hyp_extract_page()")
            ord_[b] = k                         # :146
            h = heads + k                       # :147 page_add_to_list, tail insertion
            t = pv[h]
            nx[t] = b
            pv[b] = t
            nx[b] = h
            pv[h] = b
        ord_[p] = k                             # :144 p->order-- ends at `order`

    def _split_off_external(self, p: int, k: int, order: int) -> None:
        """The same loop on an external block (6.2 .. 7.1 free one at its stale p->order): each
        buddy comes from __find_buddy_nocheck by address, NULL unless inside the range."""
        ord_, nx = self._ord, self._nx
        pa = self._pa(p)
        while k > order:
            k -= 1
            bpa = pa ^ (PAGE_SIZE << k)         # :145
            b = self._lookup(bpa) if self.range_start <= bpa < self.range_end else None
            if b is None:
                raise BuddyBug("no kernel check: NULL dereference", "__hyp_extract_page()",
                               f"__find_buddy_nocheck({pa:#x}, {k}) returned NULL (external page "
                               "of a block not inside the pool range) and :146 writes buddy->order")
            if nx[b] >= 0:
                raise self._bug_list_add(b, "__hyp_extract_page()")
            ord_[b] = k                         # :146-147
            self._link_tail(b, k)
        ord_[p] = k

    # ---- refcounts: hyp_put_page (:166-173), hyp_get_page (:175-182)

    def put(self, pa: int) -> None:
        """hyp_put_page(pool, pa): refcount--, and __hyp_attach_page when it reaches 0."""
        p = (pa >> PAGE_SHIFT) - self._org
        if p < self._lo or p >= self._shi:
            p = self._ext_index(pa, "hyp_put_page()")
        rc = self._rc
        c = rc[p]
        if not c:
            if self.rules.dec_check is not None:
                raise self._bug_dec(pa)
            rc[p] = self._rc_max                # 5.13/5.14.0: unsigned wrap, no attach
            return
        c -= 1
        rc[p] = c
        if not c:
            self._attach(p)

    def get(self, pa: int) -> None:
        """hyp_get_page(pool, pa): hyp_page_ref_inc (memory.h:52-56 in 6.12)."""
        p = (pa >> PAGE_SHIFT) - self._org
        if p < self._lo or p >= self._shi:
            p = self._ext_index(pa, "hyp_get_page()")
        rc = self._rc
        c = rc[p]
        if c == self._rc_max:
            if self.rules.inc_check is not None:
                raise self._bug_inc(pa)
            rc[p] = 0                           # 5.13: unsigned int wraps to 0, nothing else
            return
        rc[p] = c + 1

    # ---- hyp_split_page (page_alloc.c:184-196)

    def split(self, pa: int) -> None:
        """hyp_split_page(hyp_virt_to_page(pa)): head and tails become order-0 pages, tails refcount 1."""
        if not self.rules.has_split:
            raise NotImplementedError(f"hyp_split_page() does not exist in {self.rules.name}")
        p = (pa >> PAGE_SHIFT) - self._org
        if p < self._lo or p >= self._shi:
            p = self._ext_index(pa, "hyp_split_page()")
        k = self._ord[p]
        if k >= 31:                             # `1 << order` on int (:190)
            raise BuddyBug("no kernel check: undefined behaviour", "hyp_split_page()",
                           f"page {pa:#x} has order {k} (HYP_NO_ORDER is {self._no_order}): "
                           "`1 << order` overflows int")
        end = p + (1 << k)
        if p >= self._heads or end > self._shi:
            self._split_by_address(p, k)
            return
        rc, ord_ = self._rc, self._ord
        if any(rc[p + 1:end]):                  # :194 BUG_ON(tail->refcount), checked up front
            t = next(t for t in range(p + 1, end) if rc[t])
            raise self._bug_set_refcounted(t, "hyp_split_page")
        ord_[p] = 0                             # :189
        n = end - p - 1                         # :190-195, every tail: order 0, refcount 1
        ord_[p + 1:end] = [0] * n
        rc[p + 1:end] = [1] * n

    def _split_by_address(self, p: int, k: int) -> None:
        """hyp_split_page() where the tails are not all the pool's pages (an external head, or a
        block reaching past span_end): `tail = p + i` (:191) is the hyp_page of the next
        physical page, so tails are found by address, admitted external pages included."""
        rc, ord_ = self._rc, self._ord
        base = self._pa(p)
        tails = []
        for j in range(1, 1 << k):              # :194, in the kernel's order, before any change
            t = self._lookup(base + (j << PAGE_SHIFT))
            if t is None:
                raise self._untracked("hyp_split_page()", base + (j << PAGE_SHIFT))
            if rc[t]:
                raise self._bug_set_refcounted(t, "hyp_split_page")
            tails.append(t)
        ord_[p] = 0                             # :189
        for t in tails:                         # :193-194
            ord_[t] = 0
            rc[t] = 1

    # ---- observation

    def free_lists(self) -> dict[int, list[int]]:
        """order -> block addresses in list order, for every initialised free_area[order]."""
        org, nx, heads, xbase, xpfn = self._org, self._nx, self._heads, self._xbase, self._ext_pfn
        out: dict[int, list[int]] = {}
        for k in range(self._ninit):
            h = heads + k
            blocks, i = [], nx[h]
            while i != h:
                blocks.append((i + org if i < heads else xpfn[i - xbase]) << PAGE_SHIFT)
                i = nx[i]
            out[k] = blocks
        return out

    def page(self, pa: int) -> tuple[int, int]:
        """(refcount, order) exactly as struct hyp_page holds them (admitted external pages too)."""
        i = self._lookup(pa)
        if i is None:
            raise ValueError(f"{pa:#x} is not a page of this pool nor an admitted external page")
        return self._rc[i], self._ord[i]

    def pages(self) -> dict[int, tuple[int, int]]:
        """Every tracked page, the pool's then the admitted external ones: address -> (refcount, order)."""
        rc, ord_, org = self._rc, self._ord, self._org
        out = {(i + org) << PAGE_SHIFT: (rc[i], ord_[i]) for i in range(self._lo, self._shi)}
        for pfn, i in self._ext.items():
            out[pfn << PAGE_SHIFT] = (rc[i], ord_[i])
        return out

    def buddy_of(self, pa: int, order: int) -> int | None:
        """__find_buddy_nocheck (page_alloc.c:33-49): the buddy's address, or None (NULL)."""
        addr = (pa & ~(PAGE_SIZE - 1)) ^ ((PAGE_SIZE << order) & _U64)
        if addr < self.range_start or addr >= self.range_end:
            return None
        return addr

    def is_external(self, pa: int) -> bool:
        """True for a tracked page the kernel treats as outside the pool (phys >= range_end, or
        an admitted page)."""
        return not self.range_start <= pa < self.range_end

    def snapshot(self) -> dict:
        """Everything from_state() needs to rebuild this pool (its keyword arguments)."""
        return {"range_start": self.range_start, "nr_pages": self.nr_pages,
                "pages": self.pages(), "free_lists": self.free_lists(),
                "version": self.version, "max_order": self.max_order,
                "external": self.external_pages()}

    def __repr__(self) -> str:
        nfree = sum(len(v) << k for k, v in self.free_lists().items())
        return (f"HypPool({self.range_start:#x}, nr_pages={self.nr_pages}, rules={self.rules.name}, "
                f"max_order={self.max_order}, free_pages~{nfree})")
