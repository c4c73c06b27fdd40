
/*
 * pkvm-harness (CONFIG_PKVM_EL2_DUMP test kernels, 7.x): the allocator's calls and the host's
 * hypercalls, as the pkvm-harness's QEMU tracers see them (harness/kernel/overlays.py adds the
 * calls to page_alloc.c and hyp-main.c). Addresses are physical.
 */
HYP_EVENT(pkh_pool_init,
	HE_PROTO(u64 pool, u64 pfn, u32 nr_pages, u32 reserved),
	HE_STRUCT(he_field(u64, pool) he_field(u64, pfn) he_field(u32, nr_pages) he_field(u32, reserved)),
	HE_ASSIGN(__entry->pool = pool; __entry->pfn = pfn; __entry->nr_pages = nr_pages;
		  __entry->reserved = reserved;),
	HE_PRINTK("pool=0x%llx pfn=0x%llx nr_pages=%u reserved=%u", __entry->pool, __entry->pfn,
		  __entry->nr_pages, __entry->reserved)
);

HYP_EVENT(pkh_alloc,
	HE_PROTO(u64 pool, u8 order, u64 page),
	HE_STRUCT(he_field(u64, pool) he_field(u8, order) he_field(u64, page)),
	HE_ASSIGN(__entry->pool = pool; __entry->order = order; __entry->page = page;),
	HE_PRINTK("pool=0x%llx order=%u page=0x%llx", __entry->pool, __entry->order, __entry->page)
);

HYP_EVENT(pkh_get,
	HE_PROTO(u64 pool, u64 page, u16 refcount, u8 order),
	HE_STRUCT(he_field(u64, pool) he_field(u64, page) he_field(u16, refcount) he_field(u8, order)),
	HE_ASSIGN(__entry->pool = pool; __entry->page = page; __entry->refcount = refcount;
		  __entry->order = order;),
	HE_PRINTK("pool=0x%llx page=0x%llx refcount=%u order=%u", __entry->pool, __entry->page,
		  __entry->refcount, __entry->order)
);

HYP_EVENT(pkh_put,
	HE_PROTO(u64 pool, u64 page, u16 refcount, u8 order),
	HE_STRUCT(he_field(u64, pool) he_field(u64, page) he_field(u16, refcount) he_field(u8, order)),
	HE_ASSIGN(__entry->pool = pool; __entry->page = page; __entry->refcount = refcount;
		  __entry->order = order;),
	HE_PRINTK("pool=0x%llx page=0x%llx refcount=%u order=%u", __entry->pool, __entry->page,
		  __entry->refcount, __entry->order)
);

HYP_EVENT(pkh_split,
	HE_PROTO(u64 page),
	HE_STRUCT(he_field(u64, page)),
	HE_ASSIGN(__entry->page = page;),
	HE_PRINTK("page=0x%llx", __entry->page)
);

HYP_EVENT(pkh_hcall,
	HE_PROTO(u64 id, u64 a1, u64 a2, u64 a3),
	HE_STRUCT(he_field(u64, id) he_field(u64, a1) he_field(u64, a2) he_field(u64, a3)),
	HE_ASSIGN(__entry->id = id; __entry->a1 = a1; __entry->a2 = a2; __entry->a3 = a3;),
	HE_PRINTK("id=%llu a1=0x%llx a2=0x%llx a3=0x%llx", __entry->id, __entry->a1, __entry->a2, __entry->a3)
);

HYP_EVENT(pkh_hcall_ret,
	HE_PROTO(u64 id, u64 ret),
	HE_STRUCT(he_field(u64, id) he_field(u64, ret)),
	HE_ASSIGN(__entry->id = id; __entry->ret = ret;),
	HE_PRINTK("id=%llu ret=0x%llx", __entry->id, __entry->ret)
);
