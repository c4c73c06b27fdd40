/* SPDX-License-Identifier: GPL-2.0 */
/*
 * pkvm-harness (CONFIG_PKVM_EL2_DUMP test kernels): where page_alloc.c and hyp-main.c report the
 * allocator's calls and the host's hypercalls (harness/kernel/overlays.py adds the calls).
 *
 * With the hypervisor's trace remote (7.x, CONFIG_NVHE_EL2_TRACING) they are its pkh_* events
 * (pkvm_hypevents.h). Without it (6.12; 7.x built without EL2 debug) the allocator's calls go to
 * an event ring in hyp memory (el2_dump.c): the dump hypercall returns its head, so the harness
 * cuts a window at two snapshots and reads the entries between them through the dump
 * (harness/el2/ring.py). Addresses are physical.
 */
#ifndef __PKVM_HARNESS_PKH_EVENTS_H
#define __PKVM_HARNESS_PKH_EVENTS_H

#include <linux/types.h>

/* the events the ring has recorded since boot: the dump hypercall's result (0 with the trace remote) */
u64 pkh_ring_events(void);

#ifdef CONFIG_NVHE_EL2_TRACING
#include <asm/kvm_hypevents.h>

#define pkh_ev_pool_init	trace_pkh_pool_init
#define pkh_ev_alloc		trace_pkh_alloc
#define pkh_ev_get		trace_pkh_get
#define pkh_ev_put		trace_pkh_put
#define pkh_ev_split		trace_pkh_split
#define pkh_ev_hcall		trace_pkh_hcall
#define pkh_ev_hcall_ret	trace_pkh_hcall_ret
#else
enum pkh_kind { PKH_POOL_INIT = 1, PKH_ALLOC, PKH_GET, PKH_PUT, PKH_SPLIT };

/* 32 bytes; harness/el2/ring.py reads the same layout */
struct pkh_event {
	u32 seq;		/* the event's number since boot, from 1 (low 32 bits): 0 never written */
	u8 kind;
	u8 cpu;
	u8 order;		/* alloc: asked for; get, put: the page's at entry */
	u8 pad;
	u64 pool;		/* struct hyp_pool; 0 for split */
	u64 page;		/* the page (alloc: the block, 0 for none); pool_init: its first pfn */
	u32 a;			/* get, put: refcount at entry; pool_init: nr_pages */
	u32 b;			/* pool_init: reserved_pages */
};

#define PKH_RING_LEN 32768	/* entries (1 MiB): a power of two */

void pkh_record(u8 kind, u64 pool, u64 page, u8 order, u32 a, u32 b);

static inline void pkh_ev_pool_init(u64 pool, u64 pfn, u32 nr_pages, u32 reserved)
{
	pkh_record(PKH_POOL_INIT, pool, pfn, 0, nr_pages, reserved);
}

static inline void pkh_ev_alloc(u64 pool, u8 order, u64 page)
{
	pkh_record(PKH_ALLOC, pool, page, order, 0, 0);
}

static inline void pkh_ev_get(u64 pool, u64 page, u16 refcount, u8 order)
{
	pkh_record(PKH_GET, pool, page, order, refcount, 0);
}

static inline void pkh_ev_put(u64 pool, u64 page, u16 refcount, u8 order)
{
	pkh_record(PKH_PUT, pool, page, order, refcount, 0);
}

static inline void pkh_ev_split(u64 page)
{
	pkh_record(PKH_SPLIT, 0, page, 0, 0, 0);
}

/* every host hypercall, vCPU runs included, would overrun the ring in seconds: not recorded */
static inline void pkh_ev_hcall(u64 id, u64 a1, u64 a2, u64 a3) { }
static inline void pkh_ev_hcall_ret(u64 id, u64 ret) { }
#endif

#endif /* __PKVM_HARNESS_PKH_EVENTS_H */
