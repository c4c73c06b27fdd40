"""What a snapshot of pKVM's EL2 state holds: pools, VMs, host stage-2, hyp stage-1.

Plain data with its own arithmetic (sizes, diffs, summaries, `to_dict`). Made by the decoders of
harness.el2.decode, from live memory (harness.el2.snapshot.El2Reader) or from a recorded memory
image (harness.el2.image); read by the model's invariants, reports and pictures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from harness.el2.pgtable import PAGE_SHIFT, PAGE_SIZE, Leaf, Walk, merge_ranges
from harness.model.stage2 import DEFAULT_VMEMMAP_STATE, state_name


@dataclass
class Pool:
    name: str
    struct_pa: int
    range_start: int
    range_end: int
    max_order: int
    free_lists: dict[int, list[int]]          # order -> block PAs, in kernel list order
    lock_held: bool = False
    list_errors: list[str] = field(default_factory=list)
    pages: dict[int, tuple[int, int]] = field(default_factory=dict)   # pa -> (refcount, order)
    # Free blocks whose bytes are not all zero past their list node: (block PA, order, offset of
    # the first non-zero byte). None: their contents could not be read.
    dirty_free: list[tuple[int, int, int]] | None = None

    @property
    def nr_pages(self) -> int:
        return (self.range_end - self.range_start) >> PAGE_SHIFT

    def free_per_order(self) -> dict[int, int]:
        return {k: len(v) for k, v in self.free_lists.items()}

    @property
    def free_pages(self) -> int:
        return sum(len(v) << k for k, v in self.free_lists.items())

    @property
    def allocated_pages(self) -> int:
        return self.nr_pages - self.free_pages

    def to_dict(self) -> dict:
        return {"name": self.name, "struct_pa": self.struct_pa, "range_start": self.range_start,
                "range_end": self.range_end, "nr_pages": self.nr_pages, "max_order": self.max_order,
                "free_pages": self.free_pages, "allocated_pages": self.allocated_pages,
                "free_per_order": self.free_per_order(), "free_lists": self.free_lists,
                "list_errors": self.list_errors,
                "dirty_free": [list(d) for d in self.dirty_free] if self.dirty_free is not None else None}


@dataclass
class VmInfo:
    index: int          # slot in vm_table
    handle: int | None
    hyp_va: int
    pa: int
    nr_vcpus: int | None
    pgd_phys: int | None
    pool: Pool | None
    s2: Walk | None = None      # the VM's stage-2 as EL2 manages it (6.14+)


@dataclass
class Snapshot:
    kernel_version: str
    taken_at: float
    pause_ms: float
    attempts: int
    kimage_voffset: int
    hyp_physvirt_offset: int | None = None
    carveout: tuple[int, int] | None = None            # (base, size)
    hyp_text: tuple[int, int] | None = None            # [start, end) PA, where the host maps it read-only
    memblocks: list[tuple[int, int, int]] = field(default_factory=list)   # (base, size, flags)
    pools: dict[str, Pool] = field(default_factory=dict)
    vms: list[VmInfo] = field(default_factory=list)
    host_s2: Walk | None = None
    host_s2_root: tuple[int, int, int] | None = None   # (pgd PA, ia_bits, start level)
    hyp_s1: Walk | None = None
    lpa2: bool = False
    vmemmap_va: int | None = None
    hyp_page_shape: dict[str, int] | None = None      # {"size", "refcount_bits", "order_bits"} from DWARF
    # pa -> (host state, hyp state, host_share_guest_count) from the vmemmap (6.14+), for every
    # page whose entry is not the zeroed default; page_state() fills in the default
    page_states: dict[int, tuple[int, int, int]] | None = None
    unavailable: dict[str, str] = field(default_factory=dict)   # parts that could not be read: why
    absent: dict[str, str] = field(default_factory=dict)        # parts this kernel version lacks: why

    _vmemmap: Callable[[int], tuple[int, int]] | None = field(default=None, repr=False)

    def page(self, pa: int) -> tuple[int, int]:
        """(refcount, order) of any RAM page, as the hyp vmemmap held them at the snapshot."""
        for pool in self.pools.values():
            if pa in pool.pages:
                return pool.pages[pa]
        if self._vmemmap is None:
            raise KeyError(f"{pa:#x}: this snapshot has no vmemmap ({self.unavailable.get('vmemmap')})")
        return self._vmemmap(pa)

    def vms_since(self, older: Snapshot) -> list[VmInfo]:
        """The VMs in this snapshot that `older` did not have (by handle and address), by handle."""
        seen = {(vm.handle, vm.pa) for vm in older.vms}
        return sorted((vm for vm in self.vms if (vm.handle, vm.pa) not in seen), key=lambda vm: vm.handle or 0)

    def page_state(self, pa: int) -> tuple[int, int, int]:
        """(host state, hyp state, host_share_guest_count) of a memory page, as stored codes
        (harness.model.stage2.STATE_CODES)."""
        if self.page_states is None:
            why = self.absent.get("page_states") or self.unavailable.get("page_states")
            raise KeyError(f"this snapshot has no page states ({why})")
        return self.page_states.get(pa & ~(PAGE_SIZE - 1), DEFAULT_VMEMMAP_STATE)

    def host_state(self, pa: int) -> str:
        """The host's state of a memory page, on any version: from the vmemmap (6.14+), else from
        the host stage-2 (a valid leaf's software bits; annotated invalid: NOPAGE; never faulted
        in: OWNED)."""
        if self.page_states is not None:
            return state_name(self.page_state(pa)[0])
        leaf = self.host_s2.leaf_at(pa) if self.host_s2 else None
        if leaf is None:
            return "OWNED"
        return leaf.state or "OWNED" if leaf.valid else "NOPAGE"

    def hyp_state(self, pa: int) -> str:
        """The hyp's state of a memory page: from the vmemmap (6.14+), else from the software bits
        of its mapping in the hyp's linear map (none: NOPAGE)."""
        if self.page_states is not None:
            return state_name(self.page_state(pa)[1])
        if self.hyp_s1 is None or self.hyp_physvirt_offset is None:
            raise KeyError("this snapshot has no hyp stage-1 to read the hyp's page states from")
        leaf = self.hyp_s1.leaf_at((pa - self.hyp_physvirt_offset) & ((1 << 64) - 1))
        return leaf.state or "NOPAGE" if leaf is not None and leaf.valid else "NOPAGE"

    def diff(self, older: Snapshot) -> SnapshotDiff:
        return SnapshotDiff.between(older, self)

    def s2_summary(self) -> dict:
        """Host stage-2 by kind (memory, MMIO, hyp-owned, shared), and leaf sizes."""
        kinds: dict[str, int] = {}
        sizes: dict[int, int] = {}
        for leaf in self.host_s2.leaves if self.host_s2 else []:
            kind = self.classify(leaf)
            kinds[kind] = kinds.get(kind, 0) + leaf.size
            sizes[leaf.size] = sizes.get(leaf.size, 0) + 1
        return {"bytes_by_kind": kinds, "leaves_by_size": dict(sorted(sizes.items()))}

    def page_state_summary(self) -> dict[str, int]:
        """How many pages are in each (host, hyp) state pair; pages shared with guests."""
        out: dict[str, int] = {}
        for host, hyp, count in (self.page_states or {}).values():
            key = f"host {state_name(host)} / hyp {state_name(hyp)}"
            out[key] = out.get(key, 0) + 1
            if count:
                out["shared with guests"] = out.get("shared with guests", 0) + 1
        return dict(sorted(out.items()))

    def classify(self, leaf: Leaf) -> str:
        if not leaf.valid:
            return {1: "hyp-owned"}.get(leaf.owner or -1, f"owner-{leaf.owner}")
        if leaf.state != "OWNED":
            return "shared"
        in_ram = any(b <= leaf.addr < b + s for b, s, _ in self.memblocks)
        return "memory" if in_ram else "mmio"

    def to_dict(self) -> dict:
        return {
            "kernel_version": self.kernel_version, "taken_at": self.taken_at, "pause_ms": self.pause_ms,
            "attempts": self.attempts, "kimage_voffset": self.kimage_voffset,
            "hyp_physvirt_offset": self.hyp_physvirt_offset, "carveout": self.carveout,
            "memblocks": self.memblocks, "lpa2": self.lpa2,
            "pools": {n: p.to_dict() for n, p in self.pools.items()},
            "vms": [{"index": v.index, "handle": v.handle, "pa": v.pa, "nr_vcpus": v.nr_vcpus,
                     "pgd_phys": v.pgd_phys, "pool": v.pool.name if v.pool else None,
                     **({"s2_leaves": len(v.s2.leaves), "s2_tables": len(v.s2.tables)} if v.s2 else {})}
                    for v in self.vms],
            **({"page_states": self.page_state_summary()} if self.page_states is not None else {}),
            "host_s2": {"root": self.host_s2_root, **self.s2_summary(),
                        "ranges": [{"start": r.start, "end": r.end, "kind": r.kind}
                                   for r in merge_ranges(self.host_s2.leaves)] if self.host_s2 else [],
                        "errors": self.host_s2.errors if self.host_s2 else []},
            "hyp_s1": {"leaves": len(self.hyp_s1.leaves), "tables": len(self.hyp_s1.tables)} if self.hyp_s1 else None,
            "unavailable": self.unavailable, "absent": self.absent,
            **({"hyp_text": self.hyp_text} if self.hyp_text is not None else {}),
        }


@dataclass
class PoolDiff:
    allocated: list[int]          # pages whose refcount went 0 -> >0
    freed: list[int]              # pages whose refcount went >0 -> 0
    free_pages_delta: int
    free_per_order_delta: dict[int, int]


@dataclass
class SnapshotDiff:
    pools: dict[str, PoolDiff]
    pools_added: list[str]
    pools_removed: list[str]
    s2_added: list[Leaf]
    s2_removed: list[Leaf]
    s2_changed: list[tuple[Leaf, Leaf]]

    @classmethod
    def between(cls, old: Snapshot, new: Snapshot) -> SnapshotDiff:
        pools = {}
        for name in sorted(set(old.pools) & set(new.pools)):
            a, b = old.pools[name], new.pools[name]
            alloc = [pa for pa, (ref, _) in b.pages.items() if ref and not a.pages.get(pa, (0, 0))[0]]
            freed = [pa for pa, (ref, _) in b.pages.items() if not ref and a.pages.get(pa, (0, 0))[0]]
            orders = set(a.free_lists) | set(b.free_lists)
            per_order = {k: len(b.free_lists.get(k, [])) - len(a.free_lists.get(k, [])) for k in sorted(orders)}
            pools[name] = PoolDiff(sorted(alloc), sorted(freed), b.free_pages - a.free_pages,
                                   {k: d for k, d in per_order.items() if d})
        old_leaves = {(leaf.addr, leaf.size): leaf for leaf in (old.host_s2.leaves if old.host_s2 else [])}
        new_leaves = {(leaf.addr, leaf.size): leaf for leaf in (new.host_s2.leaves if new.host_s2 else [])}
        return cls(pools, sorted(set(new.pools) - set(old.pools)), sorted(set(old.pools) - set(new.pools)),
                   [new_leaves[k] for k in sorted(new_leaves.keys() - old_leaves.keys())],
                   [old_leaves[k] for k in sorted(old_leaves.keys() - new_leaves.keys())],
                   [(old_leaves[k], new_leaves[k]) for k in sorted(old_leaves.keys() & new_leaves.keys())
                    if old_leaves[k].pte != new_leaves[k].pte])

    def is_empty(self) -> bool:
        return not (self.pools_added or self.pools_removed or self.s2_added or self.s2_removed or self.s2_changed
                    or any(d.allocated or d.freed or d.free_pages_delta for d in self.pools.values()))
