// SPDX-License-Identifier: GPL-2.0
/*
 * pkvm_el2dump: the host half of the pkvm-harness's EL2 state dump. Never in a shipping kernel:
 * it exists only in a kernel built with kernel_configs/pkvm-el2-dump.config
 * (CONFIG_PKVM_EL2_DUMP), and lets root read any memory page, the hypervisor's included.
 *
 * /sys/kernel/debug/pkvm_el2dump/dump
 *   write: the ranges to copy, one a line: "PA NPAGES" (C notation, PA page-aligned). Lines of
 *          several writes add up, until the file is read; the next write starts a new request.
 *   read:  at offset 0 copies every page of the request at one instant: under stop_machine, so
 *          no other CPU is at EL2 or changes its state, each page through the hypercall
 *          __pkvm_el2_dump (arch/arm64/kvm/hyp/nvhe/el2_dump.c). Then, little-endian:
 *            header   "PKVMDMP2", u64 kimage_voffset, u64 nr_records, u64 nr_data_pages,
 *                     u64 seq (this dump's number: where the hypervisor has a trace remote, the
 *                     dump writes the event "selftest id=DUMP_MARK|seq" before its copies and
 *                     "selftest id=DUMP_MARK|DUMP_END|seq" after them, so a trace can be cut
 *                     where the snapshot was taken),
 *                     u64 ring_begin, u64 ring_end (where the hypervisor has the harness's event
 *                     ring instead, the events it had recorded at the first and the last copy:
 *                     they differ when EL2 changed while the pages were copied; 0 without)
 *            records  { u64 pa; u32 nr_pages; s32 kind; }  kind 0: copied (the pages follow the
 *                     records, in record order), 1: copied and all zero (no bytes), < 0: not
 *                     copied, the hypercall's -errno
 *            data     the copied pages that are not all zero
 *          Reads past offset 0 continue that dump. A read fails with -EBUSY when EL2 held a lock
 *          (read again).
 */
#include <linux/debugfs.h>
#include <linux/init.h>
#include <linux/mm.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/stop_machine.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>

#include <asm/kvm_host.h>
#include <asm/kvm_mmu.h>
#include <asm/memory.h>

#define MAX_RANGES 4096
#define MAX_PAGES 32768			/* 128 MiB a request */
#define MAX_WRITE 65536

struct dump_range {
	u64 pa;
	u64 nr;
};

struct dump_record {
	u64 pa;
	u32 nr_pages;
	s32 kind;
};

struct dump_header {
	char magic[8];
	u64 kimage_voffset;
	u64 nr_records;
	u64 nr_data_pages;
	u64 seq;
	u64 ring_begin;
	u64 ring_end;
};

#define DUMP_MARK 0x504b480000000000ULL		/* "PKH" */
#define DUMP_END (1ULL << 40)

static DEFINE_MUTEX(dump_lock);
static struct dump_range ranges[MAX_RANGES];
static int nr_ranges;
static u64 nr_pages;
static bool request_read;
static void *data;			/* a slot per requested page; kept, and grown when needed */
static u64 data_cap;
static s32 *status;
static void *meta;			/* header and records */
static size_t meta_len, data_len;
static u64 seq;
static u64 ring_begin, ring_end;	/* the hypercall's result at the first and the last copy */

#ifdef PKH_NO_HYP_FIXMAP
/*
 * 6.1 (no hyp fixmap): EL2 copies into this page, which the host shared with it once at boot,
 * and the host copies on from there; a page the host owns, EL2 leaves to the host (-ENOENT).
 */
static void *window;

static long copy_page_at(u64 pa, void *to)
{
	long ret = (long)kvm_call_hyp_nvhe(__pkvm_el2_dump, PHYS_PFN(pa), virt_to_pfn(window));

	if (ret >= 0)
		memcpy(to, window, PAGE_SIZE);
	if (ret == -ENOENT && pfn_valid(PHYS_PFN(pa))) {
		memcpy(to, phys_to_virt(pa), PAGE_SIZE);
		return 0;
	}
	return ret;
}

static int share_window(void)
{
	window = (void *)get_zeroed_page(GFP_KERNEL);
	return window ? kvm_share_hyp(window, window + PAGE_SIZE) : -ENOMEM;
}
#else
/* EL2 copies straight into the buffer, through its fixmap */
static long copy_page_at(u64 pa, void *to)
{
	return (long)kvm_call_hyp_nvhe(__pkvm_el2_dump, PHYS_PFN(pa), vmalloc_to_pfn(to));
}

static int share_window(void)
{
	return 0;
}
#endif

static int copy_all(void *unused)
{
	u64 i = 0, r, p;
	long ret = 0;
	bool first = true;

#ifdef CONFIG_NVHE_EL2_TRACING
	kvm_call_hyp_nvhe(__tracing_write_event, DUMP_MARK | seq);
#endif
	for (r = 0; r < nr_ranges; r++) {
		for (p = 0; p < ranges[r].nr; p++, i++) {
			ret = copy_page_at(ranges[r].pa + p * PAGE_SIZE, data + i * PAGE_SIZE);
			if (ret == -EBUSY)
				goto out;
			status[i] = ret < 0 ? ret : 0;
			if (ret >= 0) {
				ring_begin = first ? ret : ring_begin;
				ring_end = ret;
				first = false;
			}
		}
	}
out:
#ifdef CONFIG_NVHE_EL2_TRACING
	/* any EL2 event between the two marks came from this CPU while it copied: the harness refuses the dump */
	kvm_call_hyp_nvhe(__tracing_write_event, DUMP_MARK | DUMP_END | seq);
#endif
	return ret == -EBUSY ? -EBUSY : 0;
}

static int grow(void)
{
	if (nr_pages <= data_cap)
		return 0;
	vfree(data);
	vfree(status);
	data_cap = 0;
	/* vzalloc writes every page, so the host stage-2 maps them before EL2 is asked to */
	data = vzalloc(nr_pages * PAGE_SIZE);
	status = vzalloc(nr_pages * sizeof(*status));
	if (!data || !status) {
		vfree(data);
		vfree(status);
		data = NULL;
		status = NULL;
		return -ENOMEM;
	}
	data_cap = nr_pages;
	return 0;
}

static int take_dump(void)
{
	struct dump_header *hdr;
	struct dump_record *rec = NULL;
	u64 i = 0, r, p, nr_records = 0, kept = 0;
	int ret;

	kvfree(meta);
	meta = NULL;
	meta_len = data_len = 0;
	ret = grow();
	seq++;
	ring_begin = ring_end = 0;
	if (!ret && nr_pages) {
		/*
		 * Touch what copy_all() writes: the host stage-2 maps memory lazily, and drops a
		 * block's mapping when a page in it changes owner. A host fault while copying would
		 * change the host stage-2 half-way through the copy of its tables.
		 */
		memset(data, 0, nr_pages * PAGE_SIZE);
		memset(status, 0, nr_pages * sizeof(*status));
		ret = stop_machine(copy_all, NULL, NULL);
	}
	if (ret)
		return ret;
	meta = kvzalloc(sizeof(*hdr) + nr_pages * sizeof(*rec), GFP_KERNEL);
	if (!meta)
		return -ENOMEM;
	hdr = meta;
	for (r = 0; r < nr_ranges; r++) {
		for (p = 0; p < ranges[r].nr; p++, i++) {
			void *page = data + i * PAGE_SIZE;
			s32 kind = status[i] ? status[i] : memchr_inv(page, 0, PAGE_SIZE) ? 0 : 1;
			u64 pa = ranges[r].pa + p * PAGE_SIZE;

			if (kind == 0) {	/* compacted in place: kept <= i */
				if (kept != i)
					memcpy(data + kept * PAGE_SIZE, page, PAGE_SIZE);
				kept++;
			}
			if (rec && rec->kind == kind && rec->pa + (u64)rec->nr_pages * PAGE_SIZE == pa) {
				rec->nr_pages++;
				continue;
			}
			rec = (struct dump_record *)(hdr + 1) + nr_records++;
			rec->pa = pa;
			rec->nr_pages = 1;
			rec->kind = kind;
		}
	}
	memcpy(hdr->magic, "PKVMDMP2", 8);
	hdr->kimage_voffset = kimage_voffset;
	hdr->nr_records = nr_records;
	hdr->nr_data_pages = kept;
	hdr->seq = seq;
	hdr->ring_begin = ring_begin;
	hdr->ring_end = ring_end;
	meta_len = sizeof(*hdr) + nr_records * sizeof(*rec);
	data_len = kept * PAGE_SIZE;
	return 0;
}

static ssize_t dump_read(struct file *file, char __user *ubuf, size_t len, loff_t *ppos)
{
	size_t done = 0, n;
	ssize_t ret = 0;
	loff_t pos;

	mutex_lock(&dump_lock);
	request_read = true;
	if (*ppos == 0)
		ret = take_dump();
	if (ret)
		goto out;
	pos = *ppos;
	if (pos < meta_len) {
		n = min_t(size_t, len, meta_len - pos);
		if (copy_to_user(ubuf, meta + pos, n)) {
			ret = -EFAULT;
			goto out;
		}
		done = n;
		pos += n;
	}
	if (done < len && pos >= meta_len && pos < meta_len + data_len) {
		n = min_t(size_t, len - done, meta_len + data_len - pos);
		if (copy_to_user(ubuf + done, data + (pos - meta_len), n)) {
			ret = -EFAULT;
			goto out;
		}
		done += n;
		pos += n;
	}
	*ppos = pos;
	ret = done;
out:
	mutex_unlock(&dump_lock);
	return ret;
}

static ssize_t dump_write(struct file *file, const char __user *ubuf, size_t len, loff_t *ppos)
{
	unsigned long long pa, nr;
	char *buf, *cur, *line;
	ssize_t ret = len;

	if (len == 0 || len >= MAX_WRITE)
		return -EINVAL;
	buf = memdup_user_nul(ubuf, len);
	if (IS_ERR(buf))
		return PTR_ERR(buf);
	mutex_lock(&dump_lock);
	if (request_read) {
		nr_ranges = 0;
		nr_pages = 0;
		request_read = false;
	}
	cur = buf;
	while ((line = strsep(&cur, "\n")) != NULL) {
		if (!*line)
			continue;
		if (sscanf(line, "%lli %lli", &pa, &nr) != 2 || !PAGE_ALIGNED(pa) || !nr)
			ret = -EINVAL;
		else if (nr_ranges == MAX_RANGES || nr > MAX_PAGES - nr_pages)
			ret = -E2BIG;
		if (ret < 0) {		/* a bad request is dropped whole */
			nr_ranges = 0;
			nr_pages = 0;
			break;
		}
		ranges[nr_ranges].pa = pa;
		ranges[nr_ranges++].nr = nr;
		nr_pages += nr;
	}
	mutex_unlock(&dump_lock);
	kfree(buf);
	return ret;
}

static const struct file_operations dump_fops = {
	.owner = THIS_MODULE, .read = dump_read, .write = dump_write, .llseek = default_llseek,
};

static int __init pkvm_el2dump_init(void)
{
	struct dentry *dir;

	if (!is_protected_kvm_enabled())
		return 0;
	if (share_window()) {
		pr_err("pkvm_el2dump: could not share a page with the hypervisor: no EL2 dump\n");
		return 0;
	}
	dir = debugfs_create_dir("pkvm_el2dump", NULL);
	debugfs_create_file("dump", 0600, dir, NULL, &dump_fops);
	pr_warn("pkvm_el2dump: an EL2 memory dump interface is in this kernel (a pkvm-harness test kernel)\n");
	return 0;
}
late_initcall(pkvm_el2dump_init);
