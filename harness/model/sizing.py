"""How much memory pKVM reserves for EL2 at boot, computed as kvm_hyp_reserve() does (pure).

Linux 6.12, arch/arm64/kvm/pkvm.c:59-105 and arch/arm64/include/asm/kvm_pkvm.h:27-130:

  hyp_mem_pages = hyp_s1_pgtable_pages()      every memblock at page granularity + 1 GiB private
                + host_s2_pgtable_pages()     every memblock at page granularity + 16 + 1 GiB MMIO
                + hyp_vm_table_pages()        KVM_MAX_PVMS pointers
                + hyp_vmemmap_pages()         a struct hyp_page per page of every memblock
                + hyp_ffa_proxy_pages()       FF-A mailboxes and one fragmented descriptor

then rounded up to 2 MiB when the PMD-aligned allocation succeeds (it does on the machines here),
and printed as "Reserved N MiB at 0x...".

Before 6.2 (6.1: arch/arm64/kvm/pkvm.c:54-99) there is no vm_table and no FF-A proxy, and the
vmemmap backs only the carveout itself: its size is the fixed point of "a hyp_page per carveout
page, plus the page tables mapping them".
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.kernel.version import KernelVersion, VersionLike

PAGE_SHIFT = 12
PAGE = 1 << PAGE_SHIFT
PTRS_PER_PTE = 512
PMD_SIZE = 2 << 20
SZ_1G = 1 << 30
KVM_MAX_PVMS = 255
# How many page-table levels are counted: KernelVersion.kvm_pgtable_levels (5 since 6.7, LPA2).
# hyp_ffa_proxy_pages(): 2 mailbox pages + DIV_ROUND_UP(desc_max, PAGE_SIZE), where desc_max =
# sizeof(ffa_mem_region) 48 + sizeof(ffa_mem_region_attributes) 16 + sizeof(ffa_composite_mem_region)
# 16 + SG_MAX_SEGMENTS (2048 on arm64, which chains scatterlists) * sizeof(ffa_mem_region_addr_range) 16
# = 32848 bytes -> 9 pages.
FFA_PROXY_PAGES = 2 + -(-(48 + 16 + 16 + 2048 * 16) // PAGE)


@dataclass(frozen=True)
class HypReserve:
    hyp_s1: int
    host_s2: int
    vm_table: int
    vmemmap: int
    ffa_proxy: int

    @property
    def pages(self) -> int:
        return self.hyp_s1 + self.host_s2 + self.vm_table + self.vmemmap + self.ffa_proxy

    @property
    def bytes(self) -> int:
        """What memblock_phys_alloc() takes: the size rounded up to PMD_SIZE."""
        size = self.pages << PAGE_SHIFT
        return -(-size // PMD_SIZE) * PMD_SIZE

    @property
    def mib(self) -> int:
        return self.bytes >> 20


def _pgtable_max_pages(nr_pages: int, levels: int) -> int:
    """__hyp_pgtable_max_pages(): the worst case, every level fully populated."""
    total = 0
    for _ in range(levels):
        nr_pages = -(-nr_pages // PTRS_PER_PTE)
        total += nr_pages
    return total


def _vmemmap_bytes(base: int, size: int, entry_size: int) -> int:
    """hyp_vmemmap_memblock_size(): the vmemmap slice of one memblock, page-aligned outwards."""
    start = (base >> PAGE_SHIFT) * entry_size
    end = start + (size >> PAGE_SHIFT) * entry_size
    return (-(-end // PAGE) * PAGE) - (start // PAGE * PAGE)


def _carveout_vmemmap(hyp_mem_pages: int, entry_size: int, levels: int) -> int:
    """The fixed point of 6.1's kvm_hyp_reserve loop: vmemmap pages for the carveout, including
    themselves, plus the page tables that map them."""
    nr = 0
    while True:
        prev = nr
        nr = -(-((hyp_mem_pages + prev) * entry_size) // PAGE)
        nr += _pgtable_max_pages(nr, levels)
        if nr == prev:
            return nr


def hyp_reserve(memblocks: list[tuple[int, int]], version: VersionLike, hyp_page_size: int) -> HypReserve:
    """`memblocks`: (base, size) of every region in hyp_memory; `version`: the kernel's
    (KernelVersion, or a version string); `hyp_page_size`: sizeof(struct hyp_page) from the
    kernel's DWARF (4 in 6.12)."""
    kv = KernelVersion.of(version)
    if not kv.has_pkvm:
        raise ValueError(f"pKVM came with 5.13; there is no hyp memory to size in {kv}")
    levels = kv.kvm_pgtable_levels
    all_memory = sum(_pgtable_max_pages(size >> PAGE_SHIFT, levels) for _, size in memblocks)
    one_gib = _pgtable_max_pages(SZ_1G >> PAGE_SHIFT, levels)
    hyp_s1, host_s2 = all_memory + one_gib, all_memory + 16 + one_gib
    if kv.hyp_vmemmap_covers_all_memory:
        vmemmap = sum(_vmemmap_bytes(base, size, hyp_page_size) for base, size in memblocks) >> PAGE_SHIFT
    else:
        vmemmap = _carveout_vmemmap(hyp_s1 + host_s2, hyp_page_size, levels)
    return HypReserve(hyp_s1=hyp_s1, host_s2=host_s2,
                      vm_table=-(-(KVM_MAX_PVMS * 8) // PAGE) if kv.has_vm_table else 0, vmemmap=vmemmap,
                      ffa_proxy=FFA_PROXY_PAGES if kv.reserves_ffa_proxy else 0)


def memory_for_hpool_pages(pages: int, version: VersionLike, base: int = 0x4000_0000,
                           hyp_page_size: int = 4) -> int:
    """The smallest RAM size in MiB (one memblock at `base`) that gives hpool exactly `pages` pages
    (hpool is hyp_s1_pgtable_pages() long): how a test gets a pool of a chosen size on a live boot."""
    kv = KernelVersion.of(version)
    for mib in range(64, 64 << 10):
        if hyp_reserve([(base, mib << 20)], kv, hyp_page_size).hyp_s1 == pages:
            return mib
    raise ValueError(f"no memory size gives hpool {pages} pages on Linux {kv}")


def stage2_pgd_pages(ipa_bits: int) -> int:
    """Pages of a VM's stage-2 PGD, 4 KiB granule (kvm_pgtable_stage2_pgd_size): the start level
    holds 2^(ipa_bits - its shift) entries in concatenated tables of 512. Levels:
    ARM64_HW_PGTABLE_LEVELS(ipa_bits - 4), at most 4, so up to 16 tables are concatenated. Under
    pKVM a VM's IPA size is kvm_ipa_limit whatever KVM_CREATE_VM asks (mmu.c, kvm_init_stage2_mmu),
    and its EL2 pool is exactly this PGD (kvm_guest_prepare_stage2)."""
    levels = min(((ipa_bits - 4) - 4) // (PAGE_SHIFT - 3), 4)
    start_shift = PAGE_SHIFT + (PAGE_SHIFT - 3) * (levels - 1)
    return max(1, (1 << max(0, ipa_bits - start_shift)) // PTRS_PER_PTE)
