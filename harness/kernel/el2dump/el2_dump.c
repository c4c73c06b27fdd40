// SPDX-License-Identifier: GPL-2.0
/*
 * pkvm-harness: the EL2 half of the state dump. Never in a shipping kernel: it exists only in a
 * kernel built with kernel_configs/pkvm-el2-dump.config (CONFIG_PKVM_EL2_DUMP).
 *
 * __pkvm_el2_dump(src_pfn, dst_pfn) copies one page of memory (any page: the hypervisor's own,
 * a VM's, the host's) into a page the host can write, and returns the number of events the ring
 * below has recorded since boot (0 where the trace remote has them instead); -EBUSY while the host
 * stage-2 or the hyp stage-1 lock is held (the host retries), -EINVAL for a source that is not
 * memory, -EPERM for a destination the host does not own. It reads EL2 state and never
 * writes it: the copy goes through this CPU's fixmap slot and a bounce page of its own.
 */
#include <asm/cputype.h>
#include <asm/kvm_asm.h>
#include <asm/kvm_host.h>
#include <asm/kvm_hyp.h>
#include <asm/kvm_pgtable.h>

#include <nvhe/mem_protect.h>
#include <nvhe/memory.h>
#include <nvhe/mm.h>
#include <nvhe/pkh_events.h>
#include <nvhe/spinlock.h>
#include <nvhe/trap_handler.h>

static u8 bounce[PAGE_SIZE] __aligned(PAGE_SIZE);
static DEFINE_HYP_SPINLOCK(bounce_lock);

#ifndef CONFIG_NVHE_EL2_TRACING
/*
 * The allocator's calls, for kernels without the trace remote (pkh_events.h). One ring for all
 * CPUs, in the order the calls took its lock: the harness reads it through this very hypercall,
 * and knows by an entry's seq whether it was overwritten.
 */
static_assert(sizeof(struct pkh_event) == 32);

struct pkh_event pkh_ring[PKH_RING_LEN] __aligned(PAGE_SIZE);
u64 pkh_ring_head;
static DEFINE_HYP_SPINLOCK(ring_lock);

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

void pkh_record(u8 kind, u64 pool, u64 page, u8 order, u32 a, u32 b)
{
	struct pkh_event *e;
	u8 cpu = this_cpu();

	hyp_spin_lock(&ring_lock);
	e = &pkh_ring[pkh_ring_head++ & (PKH_RING_LEN - 1)];
	e->kind = kind;
	e->cpu = cpu;
	e->order = order;
	e->pool = pool;
	e->page = page;
	e->a = a;
	e->b = b;
	e->seq = (u32)pkh_ring_head;
	hyp_spin_unlock(&ring_lock);
}

u64 pkh_ring_events(void)
{
	return READ_ONCE(pkh_ring_head);
}
#else
u64 pkh_ring_events(void)
{
	return 0;
}
#endif

/*
 * The host owns the page: its stage-2 maps it, or has no entry for it yet (the host stage-2 maps
 * memory lazily, and a page given back by the hyp stays unmapped until the host touches it). An
 * invalid entry with an owner annotation is the hyp's or a guest's.
 */
static bool host_owns(phys_addr_t pa)
{
	kvm_pte_t pte = 0;
	s8 level;

	return !kvm_pgtable_get_leaf(&host_mmu.pgt, pa, &pte, &level) && (kvm_pte_valid(pte) || !pte);
}

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

void handle___pkvm_el2_dump(struct kvm_cpu_context *host_ctxt)
{
	DECLARE_REG(u64, src_pfn, host_ctxt, 1);
	DECLARE_REG(u64, dst_pfn, host_ctxt, 2);
	int ret = el2_dump_page(hyp_pfn_to_phys(src_pfn), hyp_pfn_to_phys(dst_pfn));

	cpu_reg(host_ctxt, 1) = ret ? ret : pkh_ring_events();
}
