"""Decoding pKVM's EL2 state from physical memory: pure functions over a `read(pa, size) -> bytes`.

Every function here takes the memory as a read callable, the kernel's layout (`KernelInfo`:
symbols and DWARF struct layouts, harness.el2.symbols) and kimage_voffset, and returns the plain
data of harness.el2.state. No I/O of its own, no clock, no pausing: the caller decides where the
bytes come from (QMP `pmemsave` of a stopped QEMU in harness.el2.snapshot.El2Reader, a recorded
memory image in harness.el2.image, later a QEMU plugin or /dev/mem on a board) and how they
were made consistent.

A read the source cannot serve raises (OSError, LookupError, ...); `decode_snapshot` records the
part it was decoding in `Snapshot.unavailable` and goes on with the others. A part this kernel
version lacks by design goes to `Snapshot.absent`. Kernel-version facts come from
harness.kernel.version.KernelVersion, never from version numbers compared here.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable

from harness.el2 import symbols as ksyms
from harness.el2.pgtable import PAGE_SHIFT, PAGE_SIZE, Translator, Walk, walk
from harness.el2.state import Pool, Snapshot, VmInfo
from harness.kernel.version import KernelVersion

ReadFn = Callable[[int, int], bytes]

NVHE = "__kvm_nvhe_"
MASK64 = (1 << 64) - 1
VTCR_EL2_DS = 1 << 32
MAX_VM_SLOTS = PAGE_SIZE // 8          # vm_table is one page of pointers (KVM_MAX_PVMS = 255 used)
# A slot taken by a VM still being created (RESERVED_ENTRY, nvhe/pkvm.c in 7.x): no VM to read yet.
VM_SLOT_RESERVED = 0xA110CA7ED
MAX_MEMBLOCKS = 128
DECODE_ERRORS = (ksyms.Unavailable, LookupError, OSError, struct.error, ValueError)

# What the decoders look up, so a recorded image need only carry these (harness.el2.image).
KERNEL_SYMBOLS = ("hyp_mem_base", "hyp_mem_size")
HYP_TEXT_SYMBOLS = ("__hyp_text_start", "__hyp_text_end")     # linker symbols of the kernel image
NVHE_SYMBOLS = ("hpool", "host_s2_pool", "host_mmu", "host_kvm", "hyp_memory", "hyp_memblock_nr",
                "hyp_physvirt_offset", "__hyp_vmemmap", "vm_table", "pkvm_pgtable")
STRUCTS = ("hyp_pool", "hyp_page", "host_mmu", "host_kvm", "kvm_pgtable", "pkvm_hyp_vm", "memblock_region")


def used_symbols() -> tuple[str, ...]:
    return KERNEL_SYMBOLS + HYP_TEXT_SYMBOLS + tuple(NVHE + n for n in NVHE_SYMBOLS)


def kernel_version(kernel: ksyms.KernelInfo) -> KernelVersion:
    """The kernel's KernelVersion (KernelInfo.kernel_version where symbols.py has it)."""
    known = getattr(kernel, "kernel_version", None)
    return known if isinstance(known, KernelVersion) else KernelVersion.parse(kernel.version)


def kpa(kernel: ksyms.KernelInfo, kimage_voffset: int, name: str) -> int:
    """Physical address of a kernel (or nVHE, with the prefix) symbol."""
    return (kernel.sym(name) - kimage_voffset) & MASK64


def h2p(hyp_physvirt_offset: int | None, va: int) -> int:
    """Hyp VA (linear map) -> PA."""
    if hyp_physvirt_offset is None:
        raise ksyms.Unavailable("hyp_physvirt_offset was not read")
    return (va + hyp_physvirt_offset) & MASK64


def mmu_name(kernel: ksyms.KernelInfo) -> str:
    """The host stage-2 container: `host_mmu`, called `host_kvm` before 6.2."""
    return "host_mmu" if kernel.has_struct("host_mmu") else "host_kvm"


def uint(read: ReadFn, pa: int, size: int) -> int:
    return int.from_bytes(read(pa, size), "little")


def u64(read: ReadFn, pa: int) -> int:
    return struct.unpack("<Q", read(pa, 8))[0]


def u32(read: ReadFn, pa: int) -> int:
    return struct.unpack("<I", read(pa, 4))[0]


def s8(read: ReadFn, pa: int) -> int:
    return struct.unpack("<b", read(pa, 1))[0]


def field_value(raw: bytes, f: ksyms.Field) -> int:
    """An integer field, or a bitfield (6.14+ hyp_page packs states next to the order)."""
    value = int.from_bytes(raw[f.offset:f.offset + f.size], "little")
    if f.bit_size is not None:
        value = (value >> (f.bit_offset or 0)) & ((1 << f.bit_size) - 1)
    return value


# --- locks ---------------------------------------------------------------------------------------

def lock_held(read: ReadFn, struct_pa: int, st: ksyms.Struct) -> bool:
    """A ticket spinlock in the struct at struct_pa is held (owner != next)."""
    if not (st.has("lock.owner") and st.has("lock.next")):
        return False
    owner = uint(read, struct_pa + st.offset("lock.owner"), st.field("lock.owner").size)
    nxt = uint(read, struct_pa + st.offset("lock.next"), st.field("lock.next").size)
    return owner != nxt


def locks_held(read: ReadFn, kernel: ksyms.KernelInfo, kimage_voffset: int) -> bool:
    """hpool's, host_s2_pool's or the host stage-2's lock is held: a vCPU is inside EL2."""
    pool_t = kernel.struct("hyp_pool")
    checks = [(NVHE + "hpool", pool_t), (NVHE + "host_s2_pool", pool_t)]
    mmu = mmu_name(kernel)
    if kernel.has_struct(mmu) and kernel.struct(mmu).has("lock"):
        checks.append((NVHE + mmu, kernel.struct(mmu)))
    return any(sym in kernel.symbols and lock_held(read, kpa(kernel, kimage_voffset, sym), st)
               for sym, st in checks)


# --- parts ---------------------------------------------------------------------------------------

def decode_hyp_physvirt_offset(read: ReadFn, kernel: ksyms.KernelInfo, kimage_voffset: int) -> int:
    raw = u64(read, kpa(kernel, kimage_voffset, NVHE + "hyp_physvirt_offset"))
    return raw - (1 << 64) if raw >> 63 else raw


def decode_carveout(read: ReadFn, kernel: ksyms.KernelInfo, kimage_voffset: int) -> tuple[int, int]:
    """(base, size) of the hyp carveout (hyp_mem_base, hyp_mem_size)."""
    return (u64(read, kpa(kernel, kimage_voffset, "hyp_mem_base")),
            u64(read, kpa(kernel, kimage_voffset, "hyp_mem_size")))


def decode_memblocks(read: ReadFn, kernel: ksyms.KernelInfo, kimage_voffset: int) -> list[tuple[int, int, int]]:
    """EL2's copy of the memblocks (hyp_memory[hyp_memblock_nr]): (base, size, flags)."""
    region = kernel.struct("memblock_region")
    nr = u32(read, kpa(kernel, kimage_voffset, NVHE + "hyp_memblock_nr"))
    base = kpa(kernel, kimage_voffset, NVHE + "hyp_memory")
    out = []
    for i in range(min(nr, MAX_MEMBLOCKS)):
        at = base + i * region.size
        out.append((u64(read, at + region.offset("base")), u64(read, at + region.offset("size")),
                    u32(read, at + region.offset("flags"))))
    return out


def decode_lpa2(read: ReadFn, kernel: ksyms.KernelInfo, kimage_voffset: int) -> bool:
    """The host stage-2 uses 52-bit (LPA2) descriptors: VTCR_EL2.DS."""
    name = mmu_name(kernel)
    st = kernel.struct(name)
    path = "arch.mmu.vtcr" if st.has("arch.mmu.vtcr") else "arch.vtcr"
    return bool(u64(read, kpa(kernel, kimage_voffset, NVHE + name) + st.offset(path)) & VTCR_EL2_DS)


def decode_hyp_s1(read: ReadFn, kernel: ksyms.KernelInfo, kimage_voffset: int, hyp_physvirt_offset: int | None,
                  lpa2: bool) -> tuple[Walk, int]:
    """The hyp stage-1 (pkvm_pgtable) walked, and the hyp VA of the vmemmap (__hyp_vmemmap)."""
    pgt = kernel.struct("kvm_pgtable")
    at = kpa(kernel, kimage_voffset, NVHE + "pkvm_pgtable")
    ia = u32(read, at + pgt.offset("ia_bits"))
    sl = s8(read, at + pgt.offset("start_level"))
    root = h2p(hyp_physvirt_offset, u64(read, at + pgt.offset("pgd")))
    tree = walk(read, root, ia, sl, lpa2)
    return tree, u64(read, kpa(kernel, kimage_voffset, NVHE + "__hyp_vmemmap"))


def decode_host_s2_root(read: ReadFn, kernel: ksyms.KernelInfo, kimage_voffset: int) -> tuple[int, int, int]:
    """(pgd PA, ia_bits, start level) of the host stage-2."""
    name = mmu_name(kernel)
    st = kernel.struct(name)
    at = kpa(kernel, kimage_voffset, NVHE + name)
    return (u64(read, at + st.offset("arch.mmu.pgd_phys")), u32(read, at + st.offset("pgt.ia_bits")),
            s8(read, at + st.offset("pgt.start_level")))


def decode_pool(read: ReadFn, kernel: ksyms.KernelInfo, hyp_physvirt_offset: int | None, name: str,
                pool_pa: int) -> Pool:
    """A struct hyp_pool at pool_pa: its range and every free list, each checked as it is walked
    (never initialised, a prev that does not point back, no way back to the head)."""
    st = kernel.struct("hyp_pool")
    fa = st.field("free_area")
    mo = st.field("max_order")
    node_size = fa.size // (fa.count or 1)
    raw = read(pool_pa, st.size)
    rs = int.from_bytes(raw[st.offset("range_start"):][:8], "little")
    re_ = int.from_bytes(raw[st.offset("range_end"):][:8], "little")
    max_order = int.from_bytes(raw[mo.offset:][:mo.size], "little")
    pool = Pool(name, pool_pa, rs, re_, max_order, {}, lock_held(read, pool_pa, st))
    limit = ((re_ - rs) >> PAGE_SHIFT) + 1
    nr_lists = max_order + 1 if kernel_version(kernel).free_lists_include_max_order else max_order
    for k in range(min(nr_lists, fa.count or 0)):
        head_pa = pool_pa + fa.offset + k * node_size
        head_va = (head_pa - h2p(hyp_physvirt_offset, 0)) & MASK64
        blocks: list[int] = []
        node, prev = u64(read, head_pa), head_va
        if node == 0:
            pool.list_errors.append(f"free_area[{k}] was never initialised (next is NULL)")
            continue
        while node != head_va:
            if len(blocks) > limit:
                pool.list_errors.append(f"free_area[{k}] does not return to its head (cycle?)")
                break
            pa = h2p(hyp_physvirt_offset, node)
            if u64(read, pa + 8) != prev:
                pool.list_errors.append(f"free_area[{k}]: {pa:#x}.prev does not point back")
            blocks.append(pa)
            prev, node = node, u64(read, pa)
        pool.free_lists[k] = blocks
    pool.dirty_free = _dirty_free(read, pool, node_size)
    return pool


def _dirty_free(read: ReadFn, pool: Pool, node_size: int) -> list[tuple[int, int, int]] | None:
    """The free blocks holding anything but zeroes past the list node at their start: pages are
    cleared as they are freed (__hyp_attach_page) and a node as it leaves a list
    (page_remove_from_list). None when a block could not be read."""
    dirty = []
    try:
        for order, heads in pool.free_lists.items():
            for head in heads:
                body = read(head + node_size, (PAGE_SIZE << order) - node_size)
                rest = body.lstrip(b"\0")
                if rest:
                    dirty.append((head, order, node_size + len(body) - len(rest)))
    except DECODE_ERRORS:
        return None
    return dirty


def decode_vms(read: ReadFn, kernel: ksyms.KernelInfo, kimage_voffset: int, hyp_physvirt_offset: int | None,
               into: Snapshot | None = None, lpa2: bool = False) -> list[VmInfo]:
    """Every VM in vm_table, each with its pool and, where EL2 manages it (6.14+), its stage-2.
    With `into`, VMs and pools are added to that snapshot one by one (so a VM decoded before an
    error is kept)."""
    if NVHE + "vm_table" not in kernel.symbols:
        if not kernel_version(kernel).has_vm_table:
            raise ksyms.NotInThisKernel(f"Linux {kernel.version} has no vm_table: pKVM tracks VMs at "
                                        "EL2, with per-VM pools, from 6.2")
        raise ksyms.Unavailable(f"symbol {NVHE}vm_table is not in this vmlinux")
    vms: list[VmInfo] = into.vms if into is not None else []
    table_va = u64(read, kpa(kernel, kimage_voffset, NVHE + "vm_table"))
    if not table_va:
        return vms
    st = kernel.struct("pkvm_hyp_vm")
    version = kernel_version(kernel)
    table = struct.unpack(f"<{MAX_VM_SLOTS}Q", read(h2p(hyp_physvirt_offset, table_va), PAGE_SIZE))
    for i, va in enumerate(table):
        if not va or va == VM_SLOT_RESERVED:
            continue
        pa = h2p(hyp_physvirt_offset, va)
        handle = u32(read, pa + st.offset("kvm.arch.pkvm.handle")) if st.has("kvm.arch.pkvm.handle") else None
        # the vCPUs the hyp VM holds: nr_vcpus until 6.x, then its struct kvm's created_vcpus (7.x)
        nr_field = "nr_vcpus" if st.has("nr_vcpus") else "kvm.created_vcpus"
        nr = u32(read, pa + st.offset(nr_field)) if st.has(nr_field) else None
        pgd = u64(read, pa + st.offset("kvm.arch.mmu.pgd_phys")) if st.has("kvm.arch.mmu.pgd_phys") else None
        pool = decode_pool(read, kernel, hyp_physvirt_offset, f"vm{handle if handle is not None else i}",
                           pa + st.offset("pool"))
        if into is not None:
            into.pools[pool.name] = pool
        vm = VmInfo(i, handle, va, pa, nr, pgd, pool)
        vms.append(vm)
        if pgd and version.el2_manages_guest_stage2:
            ia_bits, start = u32(read, pa + st.offset("pgt.ia_bits")), s8(read, pa + st.offset("pgt.start_level"))
            vm.s2 = walk(read, pgd, ia_bits, start, lpa2, version.typed_invalid_ptes)
    return vms


# struct hyp_page's page-state bitfields (6.14+) and PKVM_PAGE_STATE_VMEMMAP_MASK: the hyp state
# is stored as its complement, so that a zeroed vmemmap entry reads PKVM_NOPAGE for the hyp.
PAGE_STATE_FIELDS = ("__host_state", "__hyp_state_comp", "host_share_guest_count")
VMEMMAP_STATE_MASK = 0x3


def decode_page_states(read: ReadFn, kernel: ksyms.KernelInfo, hyp_s1: Walk, vmemmap_va: int,
                       memblocks: list[tuple[int, int, int]]) -> dict[int, tuple[int, int, int]]:
    """pa -> (host state, hyp state, host_share_guest_count) of every memory page whose vmemmap
    entry holds anything but the zeroed default (host OWNED, hyp NOPAGE, count 0). The bitfields'
    offsets and widths come from the DWARF; the vmemmap is found through the hyp stage-1."""
    hp = kernel.struct("hyp_page")
    if not hp.has(PAGE_STATE_FIELDS[0]):
        if not kernel_version(kernel).host_page_state_in_vmemmap:
            raise ksyms.NotInThisKernel(f"Linux {kernel.version} keeps the host's page state in the host "
                                        "stage-2's software bits: the vmemmap holds it from 6.14")
        raise ksyms.Unavailable("struct hyp_page has no __host_state in this vmlinux's DWARF")
    host_f, comp_f, count_f = (hp.field(name) for name in PAGE_STATE_FIELDS)
    size, tr = hp.size, Translator(hyp_s1.leaves)
    states: dict[int, tuple[int, int, int]] = {}
    for base, length, _ in memblocks:
        pa, end = base, base + length
        while pa < end:
            va = vmemmap_va + (pa >> PAGE_SHIFT) * size
            backing = tr.pa(va)
            if backing is None:
                raise LookupError(f"vmemmap entry of {pa:#x} (VA {va:#x}) is not mapped at EL2")
            n = min((PAGE_SIZE - (va & (PAGE_SIZE - 1))) // size, (end - pa) >> PAGE_SHIFT)
            raw = read(backing, n * size)
            if raw.count(0) != len(raw):            # most of the host's pages: all zero
                for i in range(n):
                    entry = raw[i * size:(i + 1) * size]
                    host, comp, count = (field_value(entry, f) for f in (host_f, comp_f, count_f))
                    if host or comp or count:
                        states[pa + (i << PAGE_SHIFT)] = (host, comp ^ VMEMMAP_STATE_MASK, count)
            pa += max(n, 1) << PAGE_SHIFT
    return states


def hyp_page_shape(kernel: ksyms.KernelInfo) -> dict[str, int]:
    hp = kernel.struct("hyp_page")
    ref, order = hp.field("refcount"), hp.field("order")
    return {"size": hp.size, "refcount_bits": ref.bit_size or 8 * ref.size,
            "order_bits": order.bit_size or 8 * order.size}


def vmemmap_lookup(read: ReadFn, kernel: ksyms.KernelInfo, hyp_s1: Walk,
                   vmemmap_va: int) -> Callable[[int], tuple[int, int]]:
    """pa -> (refcount, order) of its struct hyp_page, found through the hyp stage-1 mapping of
    the vmemmap (so the vmemmap's backing layout need not be re-derived)."""
    hp = kernel.struct("hyp_page")
    ref, order = hp.field("refcount"), hp.field("order")
    tr = Translator(hyp_s1.leaves)

    def page(pa: int) -> tuple[int, int]:
        va = vmemmap_va + (pa >> PAGE_SHIFT) * hp.size
        backing = tr.pa(va)
        if backing is None:
            raise LookupError(f"vmemmap entry of {pa:#x} (VA {va:#x}) is not mapped at EL2")
        raw = read(backing, hp.size)
        return field_value(raw, ref), field_value(raw, order)

    return page


# --- a whole snapshot ----------------------------------------------------------------------------

def decode_snapshot(read: ReadFn, kernel: ksyms.KernelInfo, kimage_voffset: int, *, attempts: int = 1,
                    taken_at: float = 0.0, pause_ms: float = 0.0) -> Snapshot:
    """Every part of the EL2 state; a part that fails is named in `unavailable` (or `absent`)
    and the others are still decoded. attempts/taken_at/pause_ms are the caller's to report."""
    snap = Snapshot(kernel.version, taken_at, pause_ms, attempts, kimage_voffset)

    def part(name: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except ksyms.NotInThisKernel as e:
            snap.absent[name] = str(e)
        except DECODE_ERRORS as e:
            snap.unavailable[name] = f"{type(e).__name__}: {e}"

    def offsets() -> None:
        snap.hyp_physvirt_offset = decode_hyp_physvirt_offset(read, kernel, kimage_voffset)

    def carveout() -> None:
        snap.carveout = decode_carveout(read, kernel, kimage_voffset)

    def memblocks() -> None:
        snap.memblocks.extend(decode_memblocks(read, kernel, kimage_voffset))

    def hyp_s1() -> None:
        lpa2 = snap.lpa2 or decode_lpa2(read, kernel, kimage_voffset)
        snap.hyp_s1, snap.vmemmap_va = decode_hyp_s1(read, kernel, kimage_voffset, snap.hyp_physvirt_offset, lpa2)

    def host_s2() -> None:
        snap.lpa2 = decode_lpa2(read, kernel, kimage_voffset)
        snap.host_s2_root = decode_host_s2_root(read, kernel, kimage_voffset)
        snap.host_s2 = walk(read, *snap.host_s2_root, snap.lpa2, kernel_version(kernel).typed_invalid_ptes)

    def pool(name: str) -> None:
        snap.pools[name] = decode_pool(read, kernel, snap.hyp_physvirt_offset, name,
                                       kpa(kernel, kimage_voffset, NVHE + name))

    def pages() -> None:
        if snap.hyp_s1 is None or snap.vmemmap_va is None:
            raise ksyms.Unavailable("the hyp stage-1 walk is needed to find the vmemmap")
        snap.hyp_page_shape = hyp_page_shape(kernel)
        page = vmemmap_lookup(read, kernel, snap.hyp_s1, snap.vmemmap_va)
        for p in snap.pools.values():
            for pa in range(p.range_start, p.range_end, PAGE_SIZE):
                p.pages[pa] = page(pa)
            for blocks in p.free_lists.values():     # 'external' pages freed into the pool (6.2+)
                for pa in blocks:
                    if not p.range_start <= pa < p.range_end:
                        p.pages[pa] = page(pa)
        snap._vmemmap = page

    def page_states() -> None:
        if snap.hyp_s1 is None or snap.vmemmap_va is None:
            raise ksyms.Unavailable("the hyp stage-1 walk is needed to find the vmemmap")
        snap.page_states = decode_page_states(read, kernel, snap.hyp_s1, snap.vmemmap_va, snap.memblocks)

    def hyp_text() -> None:
        start, end = (kpa(kernel, kimage_voffset, s) for s in HYP_TEXT_SYMBOLS)
        snap.hyp_text = (start & ~(PAGE_SIZE - 1), (end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))

    part("hyp_physvirt_offset", offsets)
    part("carveout", carveout)
    part("hyp_text", hyp_text)
    part("memblocks", memblocks)
    part("hyp_s1", hyp_s1)
    part("host_s2", host_s2)
    for name in ("hpool", "host_s2_pool"):
        part(f"pool {name}", functools.partial(pool, name))
    part("vm_table", lambda: decode_vms(read, kernel, kimage_voffset, snap.hyp_physvirt_offset, into=snap,
                                        lpa2=snap.lpa2))
    part("vmemmap", pages)
    part("page_states", page_states)
    return snap
