"""EL2 memory state of a running QEMU pKVM host: pools, vmemmap, VMs, host stage-2, hyp stage-1.

`El2Reader.snapshot()` stops the vCPUs, copies the hyp carveout and the nVHE data in two reads,
decodes everything from those copies, and resumes. A snapshot that finds a pool or the host
stage-2 lock held (owner != next: a vCPU was inside EL2) is thrown away and retried after the
machine ran briefly. Every offset comes from the vmlinux's DWARF (harness.el2.symbols); a part
this kernel lacks by design is listed in `Snapshot.absent`, one that could not be read in
`Snapshot.unavailable`, each with the reason.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.el2 import symbols as ksyms
from harness.el2.memory import MASK64, PhysicalMemory, RegionCache, find_kimage_voffset
from harness.el2.pgtable import PAGE_SHIFT, PAGE_SIZE, Leaf, Translator, Walk, merge_ranges, walk

NVHE = "__kvm_nvhe_"
VTCR_EL2_DS = 1 << 32
MAX_VM_SLOTS = PAGE_SIZE // 8          # vm_table is one page of pointers (KVM_MAX_PVMS = 255 used)
_DECODE_ERRORS = (ksyms.Unavailable, LookupError, OSError, struct.error, ValueError)


class SnapshotBusy(RuntimeError):
    """Every attempt found a vCPU inside EL2 holding a lock."""


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
                "list_errors": self.list_errors}


@dataclass
class VmInfo:
    index: int          # slot in vm_table
    handle: int | None
    hyp_va: int
    pa: int
    nr_vcpus: int | None
    pgd_phys: int | None
    pool: Pool | None


@dataclass
class Snapshot:
    kernel_version: str
    taken_at: float
    pause_ms: float
    attempts: int
    kimage_voffset: int
    hyp_physvirt_offset: int | None = None
    carveout: tuple[int, int] | None = None            # (base, size)
    memblocks: list[tuple[int, int, int]] = field(default_factory=list)   # (base, size, flags)
    pools: dict[str, Pool] = field(default_factory=dict)
    vms: list[VmInfo] = field(default_factory=list)
    host_s2: Walk | None = None
    host_s2_root: tuple[int, int, int] | None = None   # (pgd PA, ia_bits, start level)
    hyp_s1: Walk | None = None
    lpa2: bool = False
    vmemmap_va: int | None = None
    hyp_page_shape: dict[str, int] | None = None      # {"size", "refcount_bits", "order_bits"} from DWARF
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

    def diff(self, older: "Snapshot") -> "SnapshotDiff":
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
                     "pgd_phys": v.pgd_phys, "pool": v.pool.name if v.pool else None} for v in self.vms],
            "host_s2": {"root": self.host_s2_root, **self.s2_summary(),
                        "ranges": [{"start": r.start, "end": r.end, "kind": r.kind}
                                   for r in merge_ranges(self.host_s2.leaves)] if self.host_s2 else [],
                        "errors": self.host_s2.errors if self.host_s2 else []},
            "hyp_s1": {"leaves": len(self.hyp_s1.leaves), "tables": len(self.hyp_s1.tables)} if self.hyp_s1 else None,
            "unavailable": self.unavailable, "absent": self.absent,
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
    def between(cls, old: Snapshot, new: Snapshot) -> "SnapshotDiff":
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


class El2Reader:
    """Reads EL2 state from a QEMU target. `close()` it (or use `with`)."""

    def __init__(self, qmp_socket: Path, vmlinux: Path, cache_dir: Path | None = None) -> None:
        self.kernel = ksyms.load(vmlinux, cache_dir)
        self.mem = PhysicalMemory(qmp_socket)
        with self.mem.paused():
            self.kimage_voffset = find_kimage_voffset(self.mem, self.kernel.symbols)

    def close(self) -> None:
        self.mem.close()

    def __enter__(self) -> "El2Reader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _mmu_name(self) -> str:
        """The host stage-2 container: `host_mmu`, called `host_kvm` before 6.2."""
        return "host_mmu" if self.kernel.has_struct("host_mmu") else "host_kvm"

    def kpa(self, name: str) -> int:
        """Physical address of a kernel (or nVHE, with the prefix) symbol."""
        return (self.kernel.sym(name) - self.kimage_voffset) & MASK64

    # --- taking a snapshot -----------------------------------------------------------------

    def snapshot(self, attempts: int = 50) -> Snapshot:
        for attempt in range(1, attempts + 1):
            start = time.monotonic()
            with self.mem.paused():
                cache = RegionCache(self.mem)
                self._preload(cache)
                busy = self._locks_held(cache)
                snap = None if busy else self._decode(cache, attempt)
            cache.frozen = True
            pause_ms = (time.monotonic() - start) * 1000
            if snap is not None:
                snap.pause_ms = round(pause_ms, 1)
                return snap
            time.sleep(0.002 * attempt)      # let the vCPU inside EL2 finish and drop the lock
        raise SnapshotBusy(f"a pool or host stage-2 lock was held in all {attempts} attempts")

    def _nvhe_data_symbols(self) -> list[str]:
        names = ["hpool", "host_s2_pool", "host_mmu", "host_kvm", "hyp_memory", "hyp_memblock_nr",
                 "hyp_physvirt_offset", "__hyp_vmemmap", "vm_table", "pkvm_pgtable"]
        return [NVHE + n for n in names if NVHE + n in self.kernel.symbols]

    def _preload(self, cache: RegionCache) -> None:
        """Two big reads: the carveout (pools, tables, vmemmap backing) and the nVHE data."""
        try:
            base = cache.u64(self.kpa("hyp_mem_base"))
            size = cache.u64(self.kpa("hyp_mem_size"))
            if 0 < size <= 1 << 30:
                cache.load(base, size)
        except _DECODE_ERRORS:
            pass
        addrs = sorted(self.kpa(n) for n in self._nvhe_data_symbols())
        if addrs and addrs[-1] - addrs[0] < 16 << 20:
            cache.load(addrs[0], addrs[-1] - addrs[0] + PAGE_SIZE)

    def _locks_held(self, cache: RegionCache) -> bool:
        pool_t = self.kernel.struct("hyp_pool")
        checks = [(NVHE + "hpool", pool_t), (NVHE + "host_s2_pool", pool_t)]
        mmu_name = self._mmu_name
        if self.kernel.has_struct(mmu_name) and self.kernel.struct(mmu_name).has("lock"):
            checks.append((NVHE + mmu_name, self.kernel.struct(mmu_name)))
        for sym, st in checks:
            if sym in self.kernel.symbols and self._lock_held(cache, self.kpa(sym), st):
                return True
        return False

    @staticmethod
    def _lock_held(cache: RegionCache, struct_pa: int, st: ksyms.Struct) -> bool:
        if not (st.has("lock.owner") and st.has("lock.next")):
            return False
        owner = cache.uint(struct_pa + st.offset("lock.owner"), st.field("lock.owner").size)
        nxt = cache.uint(struct_pa + st.offset("lock.next"), st.field("lock.next").size)
        return owner != nxt

    # --- decoding ----------------------------------------------------------------------------

    def _decode(self, cache: RegionCache, attempt: int) -> Snapshot:
        snap = Snapshot(self.kernel.version, time.time(), 0.0, attempt, self.kimage_voffset)

        def part(name: str, fn) -> None:
            try:
                fn()
            except ksyms.NotInThisKernel as e:
                snap.absent[name] = str(e)
            except _DECODE_ERRORS as e:
                snap.unavailable[name] = f"{type(e).__name__}: {e}"

        part("hyp_physvirt_offset", lambda: self._offsets(cache, snap))
        part("carveout", lambda: setattr(snap, "carveout", (cache.u64(self.kpa("hyp_mem_base")),
                                                             cache.u64(self.kpa("hyp_mem_size")))))
        part("memblocks", lambda: self._memblocks(cache, snap))
        part("hyp_s1", lambda: self._hyp_s1(cache, snap))
        part("host_s2", lambda: self._host_s2(cache, snap))
        for name in ("hpool", "host_s2_pool"):
            part(f"pool {name}", lambda name=name: snap.pools.__setitem__(
                name, self._pool(cache, snap, name, self.kpa(NVHE + name))))
        part("vm_table", lambda: self._vms(cache, snap))
        part("vmemmap", lambda: self._pages(cache, snap))
        return snap

    def _offsets(self, cache: RegionCache, snap: Snapshot) -> None:
        raw = cache.u64(self.kpa(NVHE + "hyp_physvirt_offset"))
        snap.hyp_physvirt_offset = raw - (1 << 64) if raw >> 63 else raw

    def h2p(self, snap: Snapshot, va: int) -> int:
        if snap.hyp_physvirt_offset is None:
            raise ksyms.Unavailable("hyp_physvirt_offset was not read")
        return (va + snap.hyp_physvirt_offset) & MASK64

    def _memblocks(self, cache: RegionCache, snap: Snapshot) -> None:
        region = self.kernel.struct("memblock_region")
        nr = cache.u32(self.kpa(NVHE + "hyp_memblock_nr"))
        base = self.kpa(NVHE + "hyp_memory")
        for i in range(min(nr, 128)):
            at = base + i * region.size
            snap.memblocks.append((cache.u64(at + region.offset("base")), cache.u64(at + region.offset("size")),
                                   cache.u32(at + region.offset("flags"))))

    def _hyp_s1(self, cache: RegionCache, snap: Snapshot) -> None:
        pgt = self.kernel.struct("kvm_pgtable")
        at = self.kpa(NVHE + "pkvm_pgtable")
        ia = cache.u32(at + pgt.offset("ia_bits"))
        sl = struct.unpack("<b", cache.read(at + pgt.offset("start_level"), 1))[0]
        root = self.h2p(snap, cache.u64(at + pgt.offset("pgd")))
        snap.hyp_s1 = walk(cache.read, root, ia, sl, snap.lpa2 or self._lpa2(cache))
        snap.vmemmap_va = cache.u64(self.kpa(NVHE + "__hyp_vmemmap"))

    def _lpa2(self, cache: RegionCache) -> bool:
        mmu_name = self._mmu_name
        st = self.kernel.struct(mmu_name)
        path = "arch.mmu.vtcr" if st.has("arch.mmu.vtcr") else "arch.vtcr"
        return bool(cache.u64(self.kpa(NVHE + mmu_name) + st.offset(path)) & VTCR_EL2_DS)

    def _host_s2(self, cache: RegionCache, snap: Snapshot) -> None:
        mmu_name = self._mmu_name
        st = self.kernel.struct(mmu_name)
        at = self.kpa(NVHE + mmu_name)
        snap.lpa2 = self._lpa2(cache)
        pgd = cache.u64(at + st.offset("arch.mmu.pgd_phys"))
        ia = cache.u32(at + st.offset("pgt.ia_bits"))
        sl = struct.unpack("<b", cache.read(at + st.offset("pgt.start_level"), 1))[0]
        snap.host_s2_root = (pgd, ia, sl)
        snap.host_s2 = walk(cache.read, pgd, ia, sl, snap.lpa2)

    def _pool(self, cache: RegionCache, snap: Snapshot, name: str, pool_pa: int) -> Pool:
        st = self.kernel.struct("hyp_pool")
        fa = st.field("free_area")
        mo = st.field("max_order")
        node_size = fa.size // (fa.count or 1)
        raw = cache.read(pool_pa, st.size)
        rs = int.from_bytes(raw[st.offset("range_start"):][:8], "little")
        re_ = int.from_bytes(raw[st.offset("range_end"):][:8], "little")
        max_order = int.from_bytes(raw[mo.offset:][:mo.size], "little")
        pool = Pool(name, pool_pa, rs, re_, max_order, {}, self._lock_held(cache, pool_pa, st))
        limit = ((re_ - rs) >> PAGE_SHIFT) + 1
        # Before 6.4 max_order is exclusive and free_area[max_order] is never initialised.
        nr_lists = max_order if self.kernel.version_tuple < (6, 4) else max_order + 1
        for k in range(min(nr_lists, fa.count or 0)):
            head_pa = pool_pa + fa.offset + k * node_size
            head_va = (head_pa - snap.hyp_physvirt_offset) & MASK64   # type: ignore[operator]
            blocks: list[int] = []
            node, prev = cache.u64(head_pa), head_va
            if node == 0:
                pool.list_errors.append(f"free_area[{k}] was never initialised (next is NULL)")
                continue
            while node != head_va:
                if len(blocks) > limit:
                    pool.list_errors.append(f"free_area[{k}] does not return to its head (cycle?)")
                    break
                pa = self.h2p(snap, node)
                if cache.u64(pa + 8) != prev:
                    pool.list_errors.append(f"free_area[{k}]: {pa:#x}.prev does not point back")
                blocks.append(pa)
                prev, node = node, cache.u64(pa)
            pool.free_lists[k] = blocks
        return pool

    def _vms(self, cache: RegionCache, snap: Snapshot) -> None:
        if NVHE + "vm_table" not in self.kernel.symbols:
            if self.kernel.version_tuple < (6, 2):
                raise ksyms.NotInThisKernel(f"Linux {self.kernel.version} has no vm_table: pKVM tracks VMs at "
                                            "EL2, with per-VM pools, from 6.2")
            raise ksyms.Unavailable(f"symbol {NVHE}vm_table is not in this vmlinux")
        table_va = cache.u64(self.kpa(NVHE + "vm_table"))
        if not table_va:
            return
        st = self.kernel.struct("pkvm_hyp_vm")
        table = struct.unpack(f"<{MAX_VM_SLOTS}Q", cache.read(self.h2p(snap, table_va), PAGE_SIZE))
        for i, va in enumerate(table):
            if not va:
                continue
            pa = self.h2p(snap, va)
            handle = cache.u32(pa + st.offset("kvm.arch.pkvm.handle")) if st.has("kvm.arch.pkvm.handle") else None
            nr = cache.u32(pa + st.offset("nr_vcpus")) if st.has("nr_vcpus") else None
            pgd = cache.u64(pa + st.offset("kvm.arch.mmu.pgd_phys")) if st.has("kvm.arch.mmu.pgd_phys") else None
            pool = self._pool(cache, snap, f"vm{handle if handle is not None else i}", pa + st.offset("pool"))
            snap.pools[pool.name] = pool
            snap.vms.append(VmInfo(i, handle, va, pa, nr, pgd, pool))

    def _pages(self, cache: RegionCache, snap: Snapshot) -> None:
        """(refcount, order) of every page of every pool, through the hyp stage-1 mapping of the
        vmemmap (so the vmemmap's backing layout need not be re-derived)."""
        if snap.hyp_s1 is None or snap.vmemmap_va is None:
            raise ksyms.Unavailable("the hyp stage-1 walk is needed to find the vmemmap")
        hp = self.kernel.struct("hyp_page")
        ref, order = hp.field("refcount"), hp.field("order")
        snap.hyp_page_shape = {"size": hp.size, "refcount_bits": ref.bit_size or 8 * ref.size,
                               "order_bits": order.bit_size or 8 * order.size}
        tr = Translator(snap.hyp_s1.leaves)
        vmemmap_va = snap.vmemmap_va

        def page(pa: int) -> tuple[int, int]:
            va = vmemmap_va + (pa >> PAGE_SHIFT) * hp.size
            backing = tr.pa(va)
            if backing is None:
                raise LookupError(f"vmemmap entry of {pa:#x} (VA {va:#x}) is not mapped at EL2")
            raw = cache.read(backing, hp.size)   # the backing is in the carveout copy
            return field_value(raw, ref), field_value(raw, order)

        for pool in snap.pools.values():
            for pa in range(pool.range_start, pool.range_end, PAGE_SIZE):
                pool.pages[pa] = page(pa)
        snap._vmemmap = page


def field_value(raw: bytes, f: ksyms.Field) -> int:
    """An integer field, or a bitfield (6.14+ hyp_page packs states next to the order)."""
    value = int.from_bytes(raw[f.offset:f.offset + f.size], "little")
    if f.bit_size is not None:
        value = (value >> (f.bit_offset or 0)) & ((1 << f.bit_size) - 1)
    return value
