// SPDX-License-Identifier: GPL-2.0
/*
 * pkvm-harness: the EL2 half of the state dump. Never in a shipping kernel: it exists only in a
 * kernel built with kernel_configs/pkvm-el2-dump.config (CONFIG_PKVM_EL2_DUMP).
 *
 * __pkvm_el2_dump(src_pfn, dst_pfn) copies one page of memory (any page: the hypervisor's own,
 * a VM's, the host's) into a page the host can write, and returns the number of events the rings
 * below have recorded since boot (pkh_ring_events); -EBUSY while the host
 * stage-2 or the hyp stage-1 lock is held (the host retries), -EINVAL for a source that is not
 * memory, -EPERM for a destination the host does not own. It reads EL2 state and never
 * writes it: the copy goes through this CPU's fixmap slot and a bounce page of its own.
 *
 * Without a hyp fixmap (6.1: PKH_NO_HYP_FIXMAP, from KernelVersion.has_hyp_fixmap) the hyp
 * copies through its own linear map, which holds every page it owns or was shared, into the one
 * page the host shared with it for the purpose; a source page only the host owns it leaves to
 * the host (-ENOENT: the host reads its own memory).
 */
#include <asm/cputype.h>
#include <asm/kvm_asm.h>
#include <asm/kvm_host.h>
#include <asm/kvm_hyp.h>
#include <asm/kvm_mmu.h>		/* before nvhe/mem_protect.h, which 6.1's needs it for */
#include <asm/kvm_pgtable.h>

#include <nvhe/mem_protect.h>
#include <nvhe/memory.h>
#include <nvhe/mm.h>
#include <nvhe/pkh_events.h>
#include <nvhe/spinlock.h>
#include <nvhe/trap_handler.h>

/* each from a KernelVersion fact, through the overlay's Makefile lines (harness/kernel/overlays.py) */
#ifdef PKH_HOST_KVM
#define host_mmu host_kvm		/* the host stage-2 and its lock's name before 6.2 (has_host_mmu) */
#endif
#ifdef PKH_U32_LEVELS
typedef u32 pkh_level_t;		/* page-table levels before LPA2's s8 (pgtable_levels_signed) */
#else
typedef s8 pkh_level_t;
#endif

#ifndef PKH_NO_HYP_FIXMAP
static u8 bounce[PAGE_SIZE] __aligned(PAGE_SIZE);
static hyp_spinlock_t bounce_lock;		/* zero: unlocked (6.1 has no DEFINE_HYP_SPINLOCK) */
#endif

/*
 * The allocator's calls (pkh_ring), the host/hyp transitions and the hypercalls that made them
 * (pkh_xring): pkh_events.h. Each ring holds all CPUs' calls, in the order they took its lock: the
 * harness reads them through this very hypercall, and knows by an entry's seq (its number in its
 * ring) whether it was overwritten.
 */
static_assert(sizeof(struct pkh_event) == 32);

struct pkh_event pkh_ring[PKH_RING_LEN] __aligned(PAGE_SIZE);
struct pkh_event pkh_xring[PKH_XRING_LEN] __aligned(PAGE_SIZE);
u64 pkh_ring_head, pkh_xring_head;
static hyp_spinlock_t ring_lock;		/* both rings: one order across them */

/* the host hypercall this CPU is in: recorded in the ring only once it makes a transition */
struct pkh_call {
	u64 id, a1, a2, a3;
	u32 entry;		/* its PKH_HCALL entry's seq; 0: not recorded yet */
	bool in;
};
static DEFINE_PER_CPU(struct pkh_call, pkh_call);

/* the logical CPU number, as the host and QEMU count (6.12's hyp has no smp_processor_id) */
static u8 this_cpu(void)
{
	u64 mpidr = read_sysreg(mpidr_el1) & MPIDR_HWID_BITMASK;
	unsigned int cpu;

	for (cpu = 0; cpu < ARRAY_SIZE(hyp_cpu_logical_map); cpu++)
		if (hyp_cpu_logical_map[cpu] == mpidr)
			return cpu;
	return U8_MAX;
}

u32 pkh_record(u8 kind, u64 pool, u64 page, u8 order, u32 a, u32 b)
{
	struct pkh_event *e;
	u8 cpu = this_cpu();
	u32 seq;

	hyp_spin_lock(&ring_lock);
	if (kind < PKH_HCALL) {
		e = &pkh_ring[pkh_ring_head++ & (PKH_RING_LEN - 1)];
		seq = (u32)pkh_ring_head;
	} else {
		e = &pkh_xring[pkh_xring_head++ & (PKH_XRING_LEN - 1)];
		seq = (u32)pkh_xring_head;
	}
	e->kind = kind;
	e->cpu = cpu;
	e->order = order;
	e->pool = pool;
	e->page = page;
	e->a = a;
	e->b = b;
	e->seq = seq;
	hyp_spin_unlock(&ring_lock);
	return seq;
}

u64 pkh_ring_events(void)
{
	u64 head, xhead;

	hyp_spin_lock(&ring_lock);
	head = pkh_ring_head;
	xhead = pkh_xring_head;
	hyp_spin_unlock(&ring_lock);
	return (xhead & (BIT_ULL(PKH_XCOUNT_BITS) - 1)) << PKH_COUNT_BITS | (head & (BIT_ULL(PKH_COUNT_BITS) - 1));
}

void pkh_hcall_enter(u64 id, u64 a1, u64 a2, u64 a3)
{
	struct pkh_call *c = this_cpu_ptr(&pkh_call);

	*c = (struct pkh_call){ .id = id, .a1 = a1, .a2 = a2, .a3 = a3, .in = true };
}

void pkh_hcall_exit(u64 id, u64 ret)
{
	struct pkh_call *c = this_cpu_ptr(&pkh_call);

	if (c->in && c->entry)
		pkh_record(PKH_HCALL_RET, 0, ret, 0, (u32)id, c->entry);
	c->in = false;
}

/* FNV-1a 64 of a page past its first word (a memcache link), as el2trace.c's page_scan */
static u64 page_hash(const u8 *page, u64 pa, u64 *first_dirty)
{
	u64 hash = 0xcbf29ce484222325ULL;
	int b;

	for (b = 8; b < PAGE_SIZE; b++) {
		if (first_dirty && page[b] && *first_dirty == ~0ULL)
			*first_dirty = pa + b;
		hash = (hash ^ page[b]) * 0x100000001b3ULL;
	}
	return hash;
}

static bool hyp_maps(phys_addr_t pa)
{
	kvm_pte_t pte = 0;
	pkh_level_t level;

	return !kvm_pgtable_get_leaf(&pkvm_pgtable, (u64)hyp_phys_to_virt(pa), &pte, &level) && kvm_pte_valid(pte);
}

/*
 * The pages as el2trace scans them: a hash of each of the first, where the rest are first dirty.
 * Only pages the hyp maps are read (a donation whose mapping failed, a give-back the kernel will
 * refuse: nothing is scanned); the caller holds pkvm_pgd_lock, so none is unmapped meanwhile.
 */
static void scan_pages(u64 pa, u64 nr_pages)
{
	u64 i, first = ~0ULL, n = min_t(u64, nr_pages, PKH_SCAN_MAX);

	for (i = 0; i < n; i++)
		if (!hyp_maps(pa + i * PAGE_SIZE))
			return;
	for (i = 0; i < n; i++) {
		u64 at = pa + i * PAGE_SIZE;
		u64 hash = page_hash(hyp_phys_to_virt(at), at, i >= PKH_SCAN_HASHED ? &first : NULL);

		if (i < PKH_SCAN_HASHED)
			pkh_record(PKH_SCAN, hash, at, 0, (u32)i, 0);
	}
	pkh_record(PKH_SCAN_END, pa, first, 0, (u32)n, 0);
}

/* before the hyp gives pages back, before it takes a lock of its own */
void pkh_scan_hyp_pages(u64 pa, u64 nr_pages)
{
	hyp_spin_lock(&pkvm_pgd_lock);
	scan_pages(pa, nr_pages);
	hyp_spin_unlock(&pkvm_pgd_lock);
}

void pkh_transition(u8 fn, u64 pa, u64 nr_pages, int ret)
{
	struct pkh_call *c = this_cpu_ptr(&pkh_call);

	if (fn == PKH_DONATE_HYP && !ret)
		scan_pages(pa, nr_pages);	/* now the hyp's: what the host gave (pkvm_pgd_lock held) */
	if (c->in && !c->entry)
		c->entry = pkh_record(PKH_HCALL, c->a1, c->a2, 0, (u32)c->id, (u32)c->a3);
	pkh_record(PKH_XFER, c->in ? c->entry : 0, pa, fn, (u32)min_t(u64, nr_pages, U32_MAX), (u32)ret);
}

/*
 * The host owns the page: its stage-2 maps it, or has no entry for it yet (the host stage-2 maps
 * memory lazily, and a page given back by the hyp stays unmapped until the host touches it). An
 * invalid entry with an owner annotation is the hyp's or a guest's.
 */
static bool host_owns(phys_addr_t pa)
{
	kvm_pte_t pte = 0;
	pkh_level_t level;

	return !kvm_pgtable_get_leaf(&host_mmu.pgt, pa, &pte, &level) && (kvm_pte_valid(pte) || !pte);
}

#ifdef PKH_NO_HYP_FIXMAP
static int el2_dump_page(phys_addr_t src, phys_addr_t dst)
{
	bool src_mapped, dst_shared, src_hosts;

	if (hyp_spin_is_locked(&host_mmu.lock) || hyp_spin_is_locked(&pkvm_pgd_lock))
		return -EBUSY;
	if (!addr_is_memory(src) || !addr_is_memory(dst))
		return -EINVAL;
	hyp_spin_lock(&pkvm_pgd_lock);
	src_mapped = hyp_maps(src);
	dst_shared = hyp_maps(dst);
	hyp_spin_unlock(&pkvm_pgd_lock);
	hyp_spin_lock(&host_mmu.lock);
	dst_shared = dst_shared && host_owns(dst);	/* shared by the host, not given to the hyp */
	src_hosts = !src_mapped && host_owns(src);
	hyp_spin_unlock(&host_mmu.lock);
	if (!dst_shared)
		return -EPERM;
	if (!src_mapped)
		return src_hosts ? -ENOENT : -EPERM;
	memcpy(hyp_phys_to_virt(dst), hyp_phys_to_virt(src), PAGE_SIZE);
	return 0;
}
#else

static int el2_dump_page(phys_addr_t src, phys_addr_t dst)
{
	void *va;
	int ret = 0;

	if (hyp_spin_is_locked(&host_mmu.lock) || hyp_spin_is_locked(&pkvm_pgd_lock))
		return -EBUSY;
	if (!addr_is_memory(src))
		return -EINVAL;
	hyp_spin_lock(&host_mmu.lock);
	if (!addr_is_memory(dst) || !host_owns(dst))
		ret = -EPERM;
	hyp_spin_unlock(&host_mmu.lock);
	if (ret)
		return ret;

	hyp_spin_lock(&bounce_lock);
	va = hyp_fixmap_map(src);
	memcpy(bounce, va, PAGE_SIZE);
	hyp_fixmap_unmap();
	va = hyp_fixmap_map(dst);
	memcpy(va, bounce, PAGE_SIZE);
	hyp_fixmap_unmap();
	hyp_spin_unlock(&bounce_lock);
	return 0;
}
#endif

void handle___pkvm_el2_dump(struct kvm_cpu_context *host_ctxt)
{
	DECLARE_REG(u64, src_pfn, host_ctxt, 1);
	DECLARE_REG(u64, dst_pfn, host_ctxt, 2);
	int ret = el2_dump_page(hyp_pfn_to_phys(src_pfn), hyp_pfn_to_phys(dst_pfn));

	cpu_reg(host_ctxt, 1) = ret ? ret : pkh_ring_events();
}
