"""Every fact the harness knows about a kernel version, in one place.

No other module compares version numbers: each asks a named property of `KernelVersion` (what
changed in which release, and why it matters to the harness). Pure: no I/O, so `model/` uses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering


@total_ordering
@dataclass(frozen=True)
class KernelVersion:
    major: int
    minor: int
    patch: int = 0

    @classmethod
    def parse(cls, text: str) -> KernelVersion:
        """"6.12", "6.12.117", "v6.1.192", "6.13.0-rc1+" -> KernelVersion; ValueError if no X.Y in it."""
        m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
        if not m:
            raise ValueError(f"cannot parse kernel version {text!r} (expected e.g. '6.12' or '6.12.117')")
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}" if self.patch else f"{self.major}.{self.minor}"

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, KernelVersion):
            return NotImplemented
        return self.tuple < other.tuple

    @classmethod
    def of(cls, value: KernelVersion | str | tuple[int, ...]) -> KernelVersion:
        """The boundary conversion: a KernelVersion as is, a string through `parse` (recorded JSON
        holds "kernel_version": "6.12.117"), or a legacy (major, minor[, patch]) tuple."""
        if isinstance(value, KernelVersion):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, tuple) and 2 <= len(value) <= 3 and all(isinstance(x, int) for x in value):
            return cls(*value)
        raise ValueError(f"cannot take {value!r} as a kernel version (a KernelVersion, '6.12.117', or (6, 12))")

    @property
    def tuple(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    @property
    def series(self) -> str:
        """"6.12" for 6.12.117: the name of Debian's linux-source-X.Y and of a pkvm-X.Y.config."""
        return f"{self.major}.{self.minor}"

    def at_least(self, major: int, minor: int) -> bool:
        return (self.major, self.minor) >= (major, minor)

    def in_series_range(self, spec: str) -> bool:
        """Whether this kernel's series is in `spec`: "7.3+" (7.3 and later), "-6.12" (up to 6.12),
        "6.2-7.1" (both ends included) or "6.12" (that series). Data files (e.g. the KVM
        selftests list) name ranges; the comparison stays here. ValueError for anything else."""
        def series(text: str) -> tuple[int, int]:
            v = KernelVersion.parse(text)
            if str(v) != text.strip() or v.patch:
                raise ValueError(f"kernel range {spec!r}: {text!r} is not a series like 6.12")
            return (v.major, v.minor)
        mine = (self.major, self.minor)
        if spec.endswith("+"):
            return mine >= series(spec[:-1])
        lo, sep, hi = spec.partition("-")
        if not sep:
            return mine == series(spec)
        return (not lo or mine >= series(lo)) and (not hi or mine <= series(hi))

    # --- EL2 allocator ----------------------------------------------------------------------

    @property
    def free_lists_include_max_order(self) -> bool:
        """6.4 made hyp_pool.max_order inclusive: free_area[max_order] is a list. Before, it is
        never initialised and must not be walked."""
        return self.at_least(6, 4)

    # --- VMs at EL2 -------------------------------------------------------------------------

    @property
    def has_vm_table(self) -> bool:
        """6.2 brought VMs to EL2 (vm_table, pkvm_hyp_vm with a per-VM pool)."""
        return self.at_least(6, 2)

    @property
    def has_host_hyp_donations(self) -> bool:
        """6.2 (pKVM's VMs at EL2) brought page donations between host and hyp
        (__pkvm_host_donate_hyp, __pkvm_hyp_donate_host) and pins of shared pages
        (hyp_pin_shared_mem): 6.1.192's mem_protect.c has only the share pair."""
        return self.at_least(6, 2)

    @property
    def has_host_mmu(self) -> bool:
        """6.2 renamed the host stage-2 container host_kvm -> host_mmu."""
        return self.at_least(6, 2)

    # --- boot -------------------------------------------------------------------------------

    @property
    def has_hvhe(self) -> bool:
        """hVHE (the arm64_sw.hvhe override) came in 6.6: on a VHE CPU pKVM then runs in hVHE."""
        return self.at_least(6, 6)

    # --- pKVM as a whole --------------------------------------------------------------------

    @property
    def has_pkvm(self) -> bool:
        """pKVM (kvm-arm.mode=protected, the EL2 buddy allocator, kvm_hyp_reserve) came in 5.13:
        before it there is no hyp memory to size and no allocator to model."""
        return self.at_least(5, 13)

    # --- EL2 allocator rule sets (harness.model.buddy) ----------------------------------------

    @property
    def buddy_rules(self) -> str:
        """The name of the allocator rule set (harness.model.buddy._RULES) this release implements:
          "5.13"  5.13, the first merge (refcount and order unsigned int, node in struct hyp_page)
          "5.14"  5.14.0..5.14.14 ('Reduce hyp_vmemmap overhead': unsigned short fields, node in page)
          "5.15"  5.15, 5.16 and 5.14.15+ stable (hyp_split_page, BUG_ON(!p->refcount))
          "5.17+" 5.17..6.1 (max_order from get_order((nr_pages + 1) << PAGE_SHIFT))
          "6.2+"  6.2, 6.3 (non-coalescable 'external' pages, helpers moved to memory.h)
          "6.4+"  6.4..6.13 (MAX_ORDER inclusive, see free_lists_include_max_order)
          "6.14+" 6.14 .. 7.1 (u8 order, HYP_NO_ORDER 0xff)
          "7.2+"  7.2 on (an 'external' page is freed at order 0 whatever its stale p->order;
                  hyp_pool_init sets p->order = 0 on every page of the range)
        Before 5.13 (no pKVM) the 5.13 rules, the unread 6.18 .. 7.1 the 6.14 rules, and after
        NEWEST_READ the 7.2 rules, each with a `buddy_rules_warning`."""
        if not self.at_least(5, 14):
            return "5.13"
        if (self.major, self.minor) == (5, 14):
            return "5.15" if self.patch >= 15 else "5.14"
        if not self.at_least(5, 17):
            return "5.15"
        if not self.at_least(6, 2):
            return "5.17+"
        if not self.free_lists_include_max_order:
            return "6.2+"
        if not self.hyp_page_order_is_u8:
            return "6.4+"
        if not self.external_pages_freed_at_order_0:
            return "6.14+"
        return "7.2+"

    @property
    def buddy_rules_warning(self) -> str | None:
        """Why `buddy_rules` is a guess for this release, or None when the rule set was read in
        this release's own source."""
        if not self.has_pkvm:
            return "pKVM (and the EL2 buddy allocator) did not exist before 5.13; using 5.13 rules"
        if (self.major, self.minor) == (5, 14) and self.patch >= 15:
            return ("5.14.y stable took hyp_split_page and the BUG_ON(!p->refcount) fix "
                    "(stable review 'PATCH 5.14 022/169', Oct 2021); the first release "
                    "carrying them is inferred to be 5.14.15")
        if not NEWEST_READ.at_least(self.major, self.minor):
            return (f"{self.series} is newer than the newest tree read ({NEWEST_READ.series}); "
                    f"assuming the {self.buddy_rules} allocator is unchanged")
        if _READ_BEFORE_GAP < KernelVersion(self.major, self.minor) < _READ_AFTER_GAP:
            return (f"{self.series} was not read (no tree between {_READ_BEFORE_GAP} and "
                    f"{_READ_AFTER_GAP}); assuming the {self.buddy_rules} rules: the order-0 "
                    f"'external' page fix is known in {_READ_AFTER_GAP} and absent in {_READ_BEFORE_GAP}")
        return None

    @property
    def external_pages_freed_at_order_0(self) -> bool:
        """7.2: __hyp_attach_page() frees a page outside [range_start, range_end) (a memcache
        page of a VM's pool) at order 0 without coalescing, ignoring its p->order, untrusted
        since the page bypassed hyp_pool_init(); 6.2 .. 7.1 inserted it at p->order. The same
        change made hyp_pool_init() set p->order = 0 on every page of the range. Read in 7.2.13
        and 7.3.4 (page_alloc.c:101-108, :251) and absent in 6.17; 6.18 .. 7.1 were not read and
        are assumed without it (see buddy_rules_warning)."""
        return self.at_least(7, 2)

    @property
    def hyp_page_order_is_u8(self) -> bool:
        """6.14 shrank struct hyp_page: order became u8 (HYP_NO_ORDER 0xff) next to a u16
        refcount, so tail pages of a free block hold 0xff instead of 0xffff."""
        return self.at_least(6, 14)

    @classmethod
    def first_with_hyp_page_shape(cls, refcount_bits: int | None, order_bits: int | None
                                  ) -> KernelVersion | None:
        """The release whose struct hyp_page layout is (refcount bits, order bits), for shapes
        that single out one rule set: (32, 32) is 5.13 only (unsigned int fields), (16, 8) is 6.14
        on (u16 refcount, u8 order). (16, 16) spans 5.14..6.13 and picks nothing. A backported or
        vendor kernel is judged by its DWARF through this when its version string disagrees."""
        return _HYP_PAGE_SHAPES.get((refcount_bits, order_bits))   # type: ignore[arg-type]

    # --- kvm_hyp_reserve (harness.model.sizing) ------------------------------------------------

    @property
    def kvm_pgtable_levels(self) -> int:
        """How many levels __hyp_pgtable_max_pages() counts: 6.7 (LPA2) made the range
        KVM_PGTABLE_FIRST_LEVEL..KVM_PGTABLE_LAST_LEVEL -1..3 (5 levels), before it 0..3 (4), so
        the worst-case page-table reservation grows by one level's worth of pages."""
        return 5 if self.at_least(6, 7) else 4

    @property
    def hyp_vmemmap_covers_all_memory(self) -> bool:
        """6.2 (VMs at EL2) sized hyp_vmemmap for every memblock (hyp_vmemmap_pages(), a struct
        hyp_page for each page of RAM, since guest pages are tracked at EL2) and added the
        vm_table to kvm_hyp_reserve(); before, the vmemmap backed only the carveout itself (the
        fixed point in 6.1's kvm_hyp_reserve loop)."""
        return self.has_vm_table

    @property
    def reserves_ffa_proxy(self) -> bool:
        """Whether kvm_hyp_reserve() counts hyp_ffa_proxy_pages() (FF-A mailboxes and one
        fragmented descriptor). The sizing model applies it together with the 6.2 changes; only
        6.1 (without) and 6.12 (with) are checked against a live boot, so 6.2..6.4 (the FF-A
        proxy may have come later upstream) are unverified."""
        return self.has_vm_table

    # --- host stage-2 abort path (harness.model.stage2) ----------------------------------------

    @property
    def stage2_adjust_range_checks_chosen_level(self) -> bool:
        """6.16 (e728e705802f) fixed host_stage2_adjust_range(): it tests block capability on the
        level whose granule it is choosing. Before, the test ran on the already incremented
        level, so a level-0 granule (512 GiB) could be chosen and the level-3 page taken even
        when it is not inside the memblock/gap range."""
        return self.at_least(6, 16)

    @property
    def stage2_falls_back_to_page(self) -> bool:
        """7.0 (8531d5a83d8e): when no block fits inside the range, host_stage2_adjust_range()
        falls back to a level-3 page; 6.16..6.x instead WARN and return -EINVAL (a hyp panic)."""
        return self.at_least(7, 0)

    # --- guest payloads (harness.image.payloads) ------------------------------------------------

    # --- EL2 and guests -----------------------------------------------------------------------

    @property
    def el2_manages_guest_stage2(self) -> bool:
        """6.14: EL2 manages the stage-2 of normal (non-protected) VMs. Their table pages come
        from the VM's pool and, once it runs dry, from the host's memcache: pages outside any
        pool that then take hyp_get_page/hyp_put_page calls."""
        return self.at_least(6, 14)

    @property
    def has_protected_vm_type(self) -> bool:
        """The host can create a protected VM: KVM_CREATE_VM with KVM_VM_TYPE_ARM_PROTECTED
        (uapi/linux/kvm.h), whose memory is donated to the guest page by page as it faults.
        Read in 7.2.13 and 7.3.4; 6.12 has no such type; in between not verified."""
        return self.at_least(7, 2)

    @property
    def host_page_state_in_vmemmap(self) -> bool:
        """6.14: the host's page state (owned, shared, borrowed) lives in the hyp vmemmap
        (struct hyp_page __host_state), not in the host stage-2 PTEs' software bits."""
        return self.at_least(6, 14)

    # --- host stage-2 encodings -------------------------------------------------------------

    @property
    def typed_invalid_ptes(self) -> bool:
        """An invalid host stage-2 PTE carries a type in bits 63:60 (1 LOCKED, 2 DONATION,
        3 POISONED) and a donation's new owner in bits 3:1 (KVM_HOST_DONATION_PTE_OWNER_MASK);
        before, the owner id sat in bits 9:2 (KVM_INVALID_PTE_OWNER_MASK), so a hyp page read
        0x4. Read in 7.2.13 and 7.3.4; when between 6.13 and 7.2 it changed is not verified."""
        return self.at_least(7, 2)

    @property
    def host_s2_memattr_as_s1(self) -> bool:
        """The host stage-2 is KVM_PGTABLE_S2_AS_S1: every leaf, memory and MMIO alike, leaves the
        memory type to stage 1: MemAttr 0x7 (MT_S2_FWB_AS_S1) on a CPU with FEAT_S2FWB, 0xF
        (MT_S2_NORMAL) on one without. Before, memory and MMIO leaves were both MemAttr 0xF.
        Read in 7.2.13 and 7.3.4 (same caveat as typed_invalid_ptes)."""
        return self.at_least(7, 2)

    @property
    def host_maps_hyp_text_read_only(self) -> bool:
        """The hyp text stays mapped in the host stage-2, read-only and execute-never, "to be
        inspected on panic" (nvhe/setup.c, fix_host_ownership_walker); before, it was hyp-owned
        and unmapped like the rest of the hyp image. Read in 7.2.13 and 7.3.4."""
        return self.at_least(7, 2)

    @property
    def guest_transitions_read(self) -> bool:
        """The host/guest transition functions of mem_protect.c have the signatures el2trace's
        decoder reads: __pkvm_host_share_guest(pfn, gfn, nr_pages, vcpu, prot) and
        __pkvm_host_unshare_guest(gfn, nr_pages, vm). Read in 7.2 and 7.3; 6.14 had no nr_pages
        (between, not read here), so those kernels are not probed for them."""
        return self.at_least(7, 2)

    @property
    def hyp_stacks_owned_by_hyp(self) -> bool:
        """fix_host_ownership() also walks each CPU's stack page, which sits in the private VA
        range, and annotates it owner hyp. Without that walk the stack pages the host allocated
        stay the host's: mapped for it, writable, while EL2 runs on them. Read: 6.12.117, 7.2 and
        7.3 have the walk, 6.1.192 has not (where between it came is not read here)."""
        return self.at_least(6, 12)

    @property
    def refills_vcpu_memcache_for_normal_vms(self) -> bool:
        """EL2 tops up a vCPU's memcache from the host's (refill_memcache) when the host shares a
        page with a normal VM's guest (__pkvm_host_share_guest, 6.14's guest stage-2 at EL2).
        Read: 7.3 refills under handle___pkvm_host_share_guest; 6.12 never does for a normal VM."""
        return self.at_least(6, 14)

    @property
    def host_state_checks_memory(self) -> bool:
        """host_get_page_state() reads an address that is not memory as NOPAGE, so a transition
        of it is refused -EPERM. Without that (6.1.192) the check walk refuses only a non-memory
        address the host stage-2 maps (-EINVAL, __check_page_state_visitor), and an unmapped one
        passes as the host's OWNED: a share of a PFN past the end of memory succeeds and can
        never be unshared (a kernel bug the hostile host found; the fix for 6.1 is
        tests/fixes/6.1-host-share-of-non-memory.patch). Read: 6.12.117 and 7.x check."""
        return self.at_least(6, 12)

    def config_fragments(self, el2_debug: bool = True) -> list[str]:
        """kernel_configs/ fragments this version needs beyond pkvm.config: options that were
        renamed or removed between releases, and with EL2 debugging (--el2-debug on, the
        default) what hangs off NVHE_EL2_DEBUG: the EL2 stack trace, the trace remote."""
        debug = [self.pkvm_stacktrace_fragment, self.hyp_trace_fragment] if el2_debug else []
        return [f for f in (*debug, self.pan_fragment) if f]

    @property
    def hyp_trace_fragment(self) -> str | None:
        """The hypervisor's trace remote in tracefs (CONFIG_NVHE_EL2_TRACING, under
        NVHE_EL2_DEBUG): 7.3.4 needs CONFIG_FTRACE for it, 7.2.13 also CONFIG_TRACING (its Kconfig
        says `depends on TRACING && FTRACE`), which ENABLE_DEFAULT_TRACERS brings. 6.12 has no
        trace remote."""
        if not self.has_hyp_trace_remote:
            return None
        return "pkvm-el2-trace.config" if self.at_least(7, 3) else "pkvm-el2-trace-7.2.config"

    @property
    def has_hyp_fixmap(self) -> bool:
        """EL2 can map any page briefly through a per-CPU fixmap slot (hyp_fixmap_map(), nvhe/mm.c),
        which the harness's EL2 dump copies through. Read in 6.12.117 and 7.3.4; 6.1.192 has none
        (it came with pKVM's guest support, 6.2): there the dump copies through the hyp's linear
        map and a page the host shares with it."""
        return self.at_least(6, 2)

    @property
    def pgtable_levels_signed(self) -> bool:
        """The page-table walkers' level is an s8 (kvm_pgtable_get_leaf(..., s8 *level)), where it
        was a u32: LPA2's level -1 made it signed in 6.8. Read: u32 in 6.1.192, s8 in 6.12.118;
        the boundary is upstream's change, not read here."""
        return self.at_least(6, 8)

    @property
    def has_hyp_trace_remote(self) -> bool:
        """The hypervisor writes events (hyp_enter, hyp_exit, selftest) into a ring buffer the host
        reads at /sys/kernel/tracing/remotes/hypervisor/, with NVHE_EL2_DEBUG. Read in 7.2.13 and
        7.3.4; 6.12 has none; in between not verified."""
        return self.at_least(7, 2)

    @property
    def has_ownership_selftest(self) -> bool:
        """With NVHE_EL2_DEBUG, EL2 init runs pkvm_ownership_selftest (nvhe/mem_protect.c): every
        page-ownership transition on one page, each result and state asserted (a failure is a hyp
        panic at boot). Read in 7.2.13 and 7.3.4; 6.12 has none; in between not verified."""
        return self.at_least(7, 2)

    @property
    def pan_fragment(self) -> str | None:
        """CONFIG_ARM64_PAN (allnoconfig turns it off): an option up to 7.1; 7.2.13 and 7.3.4 have
        no such option (PAN is always built in). Where between 6.13 and 7.2 it went is not verified:
        a tree there without it is refused by the config check, naming CONFIG_ARM64_PAN."""
        return None if self.at_least(7, 2) else "pkvm-pan.config"

    @property
    def pkvm_stacktrace_fragment(self) -> str | None:
        """The kernel_configs/ fragment that turns on pKVM's EL2 stack trace on hyp panic.
        CONFIG_PROTECTED_NVHE_STACKTRACE came with 6.0; by 7.2 it is CONFIG_PKVM_STACKTRACE and
        depends on a new CONFIG_PKVM_DISABLE_STAGE2_ON_PANIC (read in 7.2.13 and 7.3.4; where
        between 6.13 and 7.2 the rename landed is not verified: a tree there that has the new
        name is refused by the config check, naming CONFIG_PKVM_STACKTRACE)."""
        if self.at_least(7, 2):
            return "pkvm-stacktrace.config"
        return "pkvm-stacktrace-nvhe.config" if self.at_least(6, 0) else None

    @property
    def selftests_arch(self) -> str:
        """The directory of the arm64 KVM selftests under tools/testing/selftests/kvm: 6.13 renamed
        the architecture directories to the kernel's names (aarch64 -> arm64)."""
        return "arm64" if self.at_least(6, 13) else "aarch64"


# The release the models were transcribed from (linux-source-6.12, SUBLEVEL 117; line numbers
# in harness/model refer to it): the version a model function assumes when given none.
MODEL_REFERENCE = KernelVersion(6, 12)
# The newest tree whose allocator was read (buddy_rules_warning past it).
NEWEST_READ = KernelVersion(7, 3)
# Every series up to 6.17 was read, then 7.2 and 7.3: the allocator of the series strictly
# between these two (6.18 .. 7.1) was not read (buddy_rules_warning).
_READ_BEFORE_GAP = KernelVersion(6, 17)
_READ_AFTER_GAP = KernelVersion(7, 2)
_HYP_PAGE_SHAPES = {(32, 32): KernelVersion(5, 13), (16, 8): KernelVersion(6, 14)}

VersionLike = KernelVersion | str
