/* SPDX-License-Identifier: GPL-2.0 */
/*
 * pkvm-harness (CONFIG_PKVM_EL2_DUMP test kernels): where page_alloc.c, hyp-main.c and
 * mem_protect.c report the allocator's calls, the host's hypercalls and the host/hyp page-state
 * transitions (harness/kernel/overlays.py adds the calls).
 *
 * Every kernel records them in an event ring in hyp memory (el2_dump.c): the dump hypercall
 * returns its count, so the harness cuts a window at two snapshots and reads the entries between
 * them through the dump (harness/el2/ring.py). One lock orders the ring, so its order is the order
 * the calls took effect on every CPU. With the hypervisor's trace remote (7.x,
 * CONFIG_NVHE_EL2_TRACING) the allocator's calls and the hypercalls are also its pkh_* events
 * (pkvm_hypevents.h), which the harness checks against QEMU's tracers. Addresses are physical.
 */
#ifndef __PKVM_HARNESS_PKH_EVENTS_H
#define __PKVM_HARNESS_PKH_EVENTS_H

#include <linux/types.h>

#ifdef CONFIG_NVHE_EL2_TRACING
#include <asm/kvm_hypevents.h>
#define PKH_TRACE(call)		call
#else
#define PKH_TRACE(call)		do { } while (0)
#endif

enum pkh_kind {
	PKH_POOL_INIT = 1, PKH_ALLOC, PKH_GET, PKH_PUT, PKH_SPLIT,
	PKH_HCALL,		/* a host hypercall that made a transition: recorded at its first one */
	PKH_HCALL_RET,		/* its return */
	PKH_XFER,		/* a transition function's call, at its end, under the host and hyp locks */
	PKH_SCAN,		/* a donated page's hash past its first word (the first PKH_SCAN_HASHED) */
	PKH_SCAN_END,		/* the scan's end: pages scanned, the first non-zero byte past the hashed */
};

/* the transition functions of mem_protect.c (harness/el2/ring_calls.py names them) */
enum pkh_xfer { PKH_SHARE_HYP = 1, PKH_UNSHARE_HYP, PKH_DONATE_HYP, PKH_HYP_DONATE_HOST, PKH_PIN, PKH_UNPIN };

/* 32 bytes; harness/el2/ring.py reads the same layout */
struct pkh_event {
	u32 seq;		/* the event's number since boot, from 1 (low 32 bits): 0 never written */
	u8 kind;
	u8 cpu;
	u8 order;		/* alloc: asked for; get, put: the page's at entry; xfer: enum pkh_xfer */
	u8 pad;
	u64 pool;		/* struct hyp_pool; 0 for split; hcall: x1; xfer: its hcall's seq (0: none);
				   scan: the page's hash; scan_end: the first page */
	u64 page;		/* the page (alloc: the block, 0 for none); pool_init: its first pfn;
				   hcall: x2; hcall_ret: x1 at return; scan_end: first non-zero byte or ~0 */
	u32 a;			/* get, put: refcount at entry; pool_init, xfer: nr_pages; hcall(_ret): id;
				   scan: page index; scan_end: pages scanned */
	u32 b;			/* pool_init: reserved_pages; xfer: its return; hcall: x3; hcall_ret: its seq */
};

#define PKH_RING_LEN 32768	/* allocator calls (1 MiB): a power of two */
#define PKH_XRING_LEN 8192	/* transitions, their scans and hypercalls (256 KiB): a power of two */
#define PKH_COUNT_BITS 40	/* the dump's result: xring count << 40 | ring count (harness/el2/ring.py) */
#define PKH_XCOUNT_BITS 23	/* (the result stays positive: errors are negative) */
#define PKH_SCAN_HASHED 16	/* as el2trace.c's SCAN_HASHED */
#define PKH_SCAN_MAX 1024	/* as el2trace.c's SCAN_MAX */

/*
 * The allocator's calls go to pkh_ring, the rest to pkh_xring: a test that makes a million
 * allocator calls (host stage-2 pressure) then still leaves its few transitions to be read.
 * Both counts since boot, packed: the dump hypercall's result.
 */
u64 pkh_ring_events(void);
u32 pkh_record(u8 kind, u64 pool, u64 page, u8 order, u32 a, u32 b);
void pkh_hcall_enter(u64 id, u64 a1, u64 a2, u64 a3);
void pkh_hcall_exit(u64 id, u64 ret);
void pkh_transition(u8 fn, u64 pa, u64 nr_pages, int ret);
void pkh_scan_hyp_pages(u64 pa, u64 nr_pages);

static inline void pkh_ev_pool_init(u64 pool, u64 pfn, u32 nr_pages, u32 reserved)
{
	PKH_TRACE(trace_pkh_pool_init(pool, pfn, nr_pages, reserved));
	pkh_record(PKH_POOL_INIT, pool, pfn, 0, nr_pages, reserved);
}

static inline void pkh_ev_alloc(u64 pool, u8 order, u64 page)
{
	PKH_TRACE(trace_pkh_alloc(pool, order, page));
	pkh_record(PKH_ALLOC, pool, page, order, 0, 0);
}

static inline void pkh_ev_get(u64 pool, u64 page, u16 refcount, u8 order)
{
	PKH_TRACE(trace_pkh_get(pool, page, refcount, order));
	pkh_record(PKH_GET, pool, page, order, refcount, 0);
}

static inline void pkh_ev_put(u64 pool, u64 page, u16 refcount, u8 order)
{
	PKH_TRACE(trace_pkh_put(pool, page, refcount, order));
	pkh_record(PKH_PUT, pool, page, order, refcount, 0);
}

static inline void pkh_ev_split(u64 page)
{
	PKH_TRACE(trace_pkh_split(page));
	pkh_record(PKH_SPLIT, 0, page, 0, 0, 0);
}

/*
 * Every host hypercall, vCPU runs included, would overrun the ring in seconds: the ring records
 * only those that make a transition (at the first one, and their return).
 */
static inline void pkh_ev_hcall(u64 id, u64 a1, u64 a2, u64 a3)
{
	PKH_TRACE(trace_pkh_hcall(id, a1, a2, a3));
	pkh_hcall_enter(id, a1, a2, a3);
}

static inline void pkh_ev_hcall_ret(u64 id, u64 ret)
{
	PKH_TRACE(trace_pkh_hcall_ret(id, ret));
	pkh_hcall_exit(id, ret);
}

/* a transition function's end, still under the host and hyp locks: the order they took effect */
static inline void pkh_ev_xfer(u8 fn, u64 pa, u64 nr_pages, int ret)
{
	pkh_transition(fn, pa, nr_pages, ret);
}

/* __pkvm_hyp_donate_host's entry: what the pages it gives back hold */
static inline void pkh_ev_giving_back(u64 pa, u64 nr_pages)
{
	pkh_scan_hyp_pages(pa, nr_pages);
}

#endif /* __PKVM_HARNESS_PKH_EVENTS_H */
