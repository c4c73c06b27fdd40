// SPDX-License-Identifier: GPL-2.0
/*
 * pkvm_hostile: the pkvm-harness's hostile host. Never in a shipping kernel: it exists only in a
 * kernel built with kernel_configs/pkvm-hostile-host.config (CONFIG_PKVM_HOSTILE_HOST), and lets
 * user space make host hypercalls with any arguments, as a compromised host kernel could.
 *
 * /sys/kernel/debug/pkvm_hostile/hvc
 *   write: one call a line, "ID A1 A2 A3 A4 A5" (numbers in C notation; missing ones are 0), where
 *          ID is the index in enum __kvm_host_smccc_func (the harness reads it from DWARF). Each is
 *          issued as HVC KVM_HOST_SMCCC_ID(ID), in order; a write that would take the calls
 *          kept unread past 64 is refused whole (-E2BIG) before any is issued.
 *   read:  one line a call written since the last read, "a0 a1 a2 a3" in hex (a0: the SMCCC
 *          status, a1: the handler's return). A shell's printf may write line by line: the
 *          calls of several writes are kept until they are read.
 * /sys/kernel/debug/pkvm_hostile/pages
 *   write: "alloc N [ORDER]" takes N zeroed blocks of 2^ORDER pages from the page allocator and
 *          keeps them; "free PFN" gives one back (only once it is the host's again: the harness
 *          tracks what it shared or gave).
 *   read:  the blocks held, one a line: "PFN KVA ORDER" (the block's first page frame, its kernel
 *          linear-map address, which hypercalls that take a host VA want, and its order).
 */
#include <linux/arm-smccc.h>
#include <linux/debugfs.h>
#include <linux/gfp.h>
#include <linux/init.h>
#include <linux/list.h>
#include <linux/mm.h>
#include <linux/mutex.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/uaccess.h>

#define MAX_CALLS 64
#define MAX_WRITE 4096

struct held_page {
	struct list_head node;
	struct page *page;
	unsigned int order;
};

static DEFINE_MUTEX(hostile_lock);
static LIST_HEAD(held_pages);
static struct arm_smccc_res results[MAX_CALLS];
static int nr_results;
static bool results_read;

static unsigned long hvc_id(unsigned long id)
{
	return ARM_SMCCC_CALL_VAL(ARM_SMCCC_FAST_CALL, ARM_SMCCC_SMC_64, ARM_SMCCC_OWNER_VENDOR_HYP, id);
}

static char *copy_line_buffer(const char __user *ubuf, size_t len)
{
	char *buf;

	if (len == 0 || len >= MAX_WRITE)
		return ERR_PTR(-EINVAL);
	buf = kzalloc(len + 1, GFP_KERNEL);
	if (!buf)
		return ERR_PTR(-ENOMEM);
	if (copy_from_user(buf, ubuf, len)) {
		kfree(buf);
		return ERR_PTR(-EFAULT);
	}
	return buf;
}

static int parse_call(const char *line, unsigned long long a[6])
{
	memset(a, 0, 6 * sizeof(a[0]));
	return sscanf(line, "%lli %lli %lli %lli %lli %lli", &a[0], &a[1], &a[2], &a[3], &a[4], &a[5]);
}

static ssize_t hvc_write(struct file *file, const char __user *ubuf, size_t len, loff_t *ppos)
{
	unsigned long long a[6];
	char *buf, *cur, *line;
	int calls = 0;
	ssize_t ret = len;

	buf = copy_line_buffer(ubuf, len);
	if (IS_ERR(buf))
		return PTR_ERR(buf);
	for (cur = buf; *cur; cur++)		/* count first: all of a write is issued, or none */
		calls += *cur == '\n' || !cur[1];
	mutex_lock(&hostile_lock);
	if (results_read) {
		nr_results = 0;
		results_read = false;
	}
	if (nr_results + calls > MAX_CALLS) {
		ret = -E2BIG;
		goto out;
	}
	cur = buf;
	while ((line = strsep(&cur, "\n")) != NULL) {
		if (parse_call(line, a) <= 0)
			continue;
		arm_smccc_1_1_hvc(hvc_id(a[0]), a[1], a[2], a[3], a[4], a[5], &results[nr_results]);
		nr_results++;
	}
out:
	mutex_unlock(&hostile_lock);
	kfree(buf);
	return ret;
}

static ssize_t hvc_read(struct file *file, char __user *ubuf, size_t len, loff_t *ppos)
{
	char *out;
	size_t used = 0;
	ssize_t ret;
	int i;

	out = kzalloc(MAX_CALLS * 80, GFP_KERNEL);
	if (!out)
		return -ENOMEM;
	mutex_lock(&hostile_lock);
	results_read = true;
	for (i = 0; i < nr_results; i++)
		used += scnprintf(out + used, MAX_CALLS * 80 - used, "%lx %lx %lx %lx\n",
				  results[i].a0, results[i].a1, results[i].a2, results[i].a3);
	mutex_unlock(&hostile_lock);
	ret = simple_read_from_buffer(ubuf, len, ppos, out, used);
	kfree(out);
	return ret;
}

static ssize_t pages_write(struct file *file, const char __user *ubuf, size_t len, loff_t *ppos)
{
	unsigned long long arg, order = 0;
	struct held_page *h, *tmp;
	char *buf;
	int ret = len;

	buf = copy_line_buffer(ubuf, len);
	if (IS_ERR(buf))
		return PTR_ERR(buf);
	mutex_lock(&hostile_lock);
	if (sscanf(buf, "alloc %lli %lli", &arg, &order) >= 1 && arg > 0 && arg <= 4096 && order <= 4) {
		while (arg--) {
			h = kzalloc(sizeof(*h), GFP_KERNEL);
			if (h) {
				h->order = order;
				h->page = alloc_pages(GFP_KERNEL | __GFP_ZERO, order);
			}
			if (!h || !h->page) {
				kfree(h);
				ret = -ENOMEM;
				break;
			}
			list_add_tail(&h->node, &held_pages);
		}
	} else if (sscanf(buf, "free %lli", &arg) == 1) {
		ret = -ENOENT;
		list_for_each_entry_safe(h, tmp, &held_pages, node) {
			if (page_to_pfn(h->page) == arg) {
				list_del(&h->node);
				__free_pages(h->page, h->order);
				kfree(h);
				ret = len;
				break;
			}
		}
	} else {
		ret = -EINVAL;
	}
	mutex_unlock(&hostile_lock);
	kfree(buf);
	return ret;
}

static ssize_t pages_read(struct file *file, char __user *ubuf, size_t len, loff_t *ppos)
{
	struct held_page *h;
	size_t used = 0, size = 0;
	ssize_t ret;
	char *out;

	mutex_lock(&hostile_lock);
	list_for_each_entry(h, &held_pages, node)
		size += 64;
	out = kzalloc(size + 1, GFP_KERNEL);
	if (out)
		list_for_each_entry(h, &held_pages, node)
			used += scnprintf(out + used, size + 1 - used, "%#lx %#lx %u\n", page_to_pfn(h->page),
					  (unsigned long)page_address(h->page), h->order);
	mutex_unlock(&hostile_lock);
	if (!out)
		return -ENOMEM;
	ret = simple_read_from_buffer(ubuf, len, ppos, out, used);
	kfree(out);
	return ret;
}

static const struct file_operations hvc_fops = {
	.owner = THIS_MODULE, .read = hvc_read, .write = hvc_write, .llseek = default_llseek,
};

static const struct file_operations pages_fops = {
	.owner = THIS_MODULE, .read = pages_read, .write = pages_write, .llseek = default_llseek,
};

static int __init pkvm_hostile_init(void)
{
	struct dentry *dir = debugfs_create_dir("pkvm_hostile", NULL);

	debugfs_create_file("hvc", 0600, dir, NULL, &hvc_fops);
	debugfs_create_file("pages", 0600, dir, NULL, &pages_fops);
	pr_warn("pkvm_hostile: a hostile-host hypercall interface is in this kernel (a pkvm-harness test kernel)\n");
	return 0;
}
late_initcall(pkvm_hostile_init);
