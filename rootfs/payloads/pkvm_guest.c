// SPDX-License-Identifier: GPL-2.0
/*
 * pkvm_guest: run tiny guests on a pKVM host so that EL2 creates, maps and tears down VMs, and
 * touch chosen physical addresses through /dev/mem so that EL2 maps them in the host stage-2.
 *
 *   pkvm_guest [--vms N] [--vcpus V] [--pages P] [--stride S] [--slot GPA:PAGES[:STRIDE]]...
 *              [--hold SECONDS] [--phys ADDR[:COUNT:STRIDE]]... [--protected] [--pagemap]
 *
 * Each VM has memslot 0 of P pages at GUEST_BASE (page 0 holds the code and a table of what to
 * touch), any --slot memslots, and V vCPUs. Every vCPU runs the same code: it stores to every
 * S-th data page of slot 0 and every STRIDE-th page of each --slot (so each is faulted into the
 * guest stage-2), then stores to an unmapped address, which exits to the host as MMIO. The host
 * then checks that exactly those pages were written. In 6.12 the hyp VM is created at EL2 on the
 * first KVM_RUN, so after "ready" every VM is in EL2's vm_table. The VMs are kept for --hold
 * seconds, then closed with all their vCPUs (EL2 tears each down before "done").
 * --phys reads 4 bytes at each physical address through an uncached /dev/mem mapping (the host
 * stage-2 maps it on the fault); an address with nothing behind it ends in SIGBUS, reported.
 * ADDR:COUNT:STRIDE reads COUNT addresses STRIDE bytes apart.
 * --vms 0 runs no VM (--phys only).
 * --protected creates protected VMs (KVM_VM_TYPE_ARM_PROTECTED): the pages the guest touched are
 * donated to it, so the host must not be able to read them: each read must end in SIGSEGV, and
 * the check counts those instead of the written values.
 * --pagemap prints, for every page the guest touched, the physical page behind it (read from
 * /proc/self/pagemap), so that its stage-2 at EL2 can be compared with what the host gave it.
 *
 * Output, one record per line:
 *   "phys=0x... value=0x..." or "phys=0x... error=..."
 *   "vm=I vcpu=J exit=mmio addr=0x...", "vm=I slot=K touched=T expected=E",
 *   "vm=I slot=K isolated=T expected=E" (--protected), "vm=I gpa=0x... pa=0x..." (--pagemap),
 *   "ready vms=N", "done"
 * Exit status: 0 ok, 1 a KVM call failed or a page was not touched as asked (the line
 * "error=..." says which), 2 bad usage.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stddef.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL
#define GUEST_BASE 0x40000000UL
#define MMIO_ADDR 0x10000000UL
#define TABLE_OFFSET 0x100UL
#define MAX_VMS 64
#define MAX_VCPUS 64
#define MAX_SLOTS 8
#define MAX_PHYS 8192
#ifndef KVM_VM_TYPE_ARM_PROTECTED
#define KVM_VM_TYPE_ARM_PROTECTED (1UL << 31)	/* uapi/linux/kvm.h in 7.x */
#endif

/*
 * x4 = table of {first page GPA, count, stride in bytes}, ended by count 0; x2 = MMIO address.
 * Each touched page gets the (non-zero) countdown value.
 */
static const uint32_t guest_code[] = {
	0xA8C10480, /* next: ldp  x0, x1, [x4], #16   */
	0xB40000E1, /*       cbz  x1, out              */
	0xF8408483, /*       ldr  x3, [x4], #8         */
	0xF9000001, /* loop: str  x1, [x0]             */
	0x8B030000, /*       add  x0, x0, x3           */
	0xF1000421, /*       subs x1, x1, #1           */
	0x54FFFFA1, /*       b.ne loop                 */
	0x17FFFFF9, /*       b    next                 */
	0xF900005F, /* out:  str  xzr, [x2]            */
	0x14000000, /*       b    .                    */
};

struct slot {
	uint64_t gpa;
	unsigned long pages, stride;
	void *mem;
};

static int fail(const char *what)
{
	printf("error=%s: %s\n", what, strerror(errno));
	return 1;
}

static int set_reg(int vcpu, uint64_t id, uint64_t value)
{
	struct kvm_one_reg reg = { .id = id, .addr = (uint64_t)&value };

	return ioctl(vcpu, KVM_SET_ONE_REG, &reg);
}

#define CORE_REG(x) (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG(x))

/* Create and initialise a vCPU; pKVM sizes the hyp VM on the first KVM_RUN, so every vCPU
 * must exist before any of them runs. */
static int create_vcpu(int vm, int index)
{
	struct kvm_vcpu_init init;
	int vcpu;

	vcpu = ioctl(vm, KVM_CREATE_VCPU, index);
	if (vcpu < 0)
		return -fail("KVM_CREATE_VCPU");
	if (ioctl(vm, KVM_ARM_PREFERRED_TARGET, &init) || ioctl(vcpu, KVM_ARM_VCPU_INIT, &init))
		return -fail("KVM_ARM_VCPU_INIT");
	if (set_reg(vcpu, CORE_REG(regs.pc), GUEST_BASE) ||
	    set_reg(vcpu, CORE_REG(regs.regs[2]), MMIO_ADDR) ||
	    set_reg(vcpu, CORE_REG(regs.regs[4]), GUEST_BASE + TABLE_OFFSET))
		return -fail("KVM_SET_ONE_REG");
	return vcpu;
}

static int run_vcpu(int kvm, int vcpu, int index, int vm_index)
{
	struct kvm_run *run;
	int size;

	size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		return fail("mmap kvm_run");
	if (ioctl(vcpu, KVM_RUN, 0))
		return fail("KVM_RUN");
	if (run->exit_reason != KVM_EXIT_MMIO) {
		printf("error=vm %d vcpu %d exit_reason %u, expected MMIO\n", vm_index, index, run->exit_reason);
		return 1;
	}
	printf("vm=%d vcpu=%d exit=mmio addr=0x%llx\n", vm_index, index,
	       (unsigned long long)run->mmio.phys_addr);
	munmap(run, size);
	return 0;
}

static sigjmp_buf fault_jump;

static void on_fault(int sig)
{
	(void)sig;
	siglongjmp(fault_jump, 1);
}

/* Whether the host can read the page (a page donated to a protected VM ends in SIGSEGV). */
static int host_reads(const void *page, uint64_t *value)
{
	struct sigaction sa = { .sa_handler = on_fault }, old_segv, old_bus;
	int ok = 0;

	sigaction(SIGSEGV, &sa, &old_segv);
	sigaction(SIGBUS, &sa, &old_bus);
	if (sigsetjmp(fault_jump, 1) == 0) {
		*value = *(volatile const uint64_t *)page;
		ok = 1;
	}
	sigaction(SIGSEGV, &old_segv, NULL);
	sigaction(SIGBUS, &old_bus, NULL);
	return ok;
}

/*
 * Which pages of a slot the guest wrote: exactly every stride-th one from `first`. For a
 * protected VM, exactly those must be unreadable by the host (donated), the others readable.
 */
static int check_touched(int vm_index, int k, const struct slot *s, unsigned long first, int protected)
{
	unsigned long i, touched = 0, expected = 0, wrong = 0;

	for (i = first; i < s->pages; i++) {
		int want = (i - first) % s->stride == 0;
		uint64_t value = 0;
		int readable = host_reads((char *)s->mem + i * PAGE, &value);
		int got = protected ? !readable : (readable && value != 0);

		expected += want;
		touched += got;
		wrong += want != got;
	}
	printf("vm=%d slot=%d %s=%lu expected=%lu\n", vm_index, k, protected ? "isolated" : "touched",
	       touched, expected);
	if (wrong) {
		printf("error=vm %d slot %d: %lu pages %s other than asked\n", vm_index, k, wrong,
		       protected ? "kept from the host" : "touched");
		return 1;
	}
	return 0;
}

static int print_page(int fd, int vm_index, const struct slot *s, unsigned long i)
{
	uint64_t entry = 0;

	if (pread(fd, &entry, 8, (off_t)((uintptr_t)s->mem / PAGE + i) * 8) != 8)
		return fail("read /proc/self/pagemap");
	if (entry >> 63)
		printf("vm=%d gpa=0x%llx pa=0x%llx\n", vm_index, (unsigned long long)(s->gpa + i * PAGE),
		       (unsigned long long)((entry & ((1ULL << 55) - 1)) * PAGE));
	else
		printf("vm=%d gpa=0x%llx pa=none\n", vm_index, (unsigned long long)(s->gpa + i * PAGE));
	return 0;
}

/* The physical page behind each page the guest touched (page 0 of slot 0 is its code). */
static int print_pagemap(int vm_index, const struct slot *slots, int nslots)
{
	int fd = open("/proc/self/pagemap", O_RDONLY), k, err = 0;
	unsigned long i;

	if (fd < 0)
		return fail("open /proc/self/pagemap");
	err = print_page(fd, vm_index, &slots[0], 0);
	for (k = 0; k < nslots && !err; k++)
		for (i = k == 0 ? 1 : 0; i < slots[k].pages && !err; i += slots[k].stride)
			err = print_page(fd, vm_index, &slots[k], i);
	close(fd);
	return err;
}

static void touch_phys(const unsigned long *addrs, int n)
{
	struct sigaction sa = { .sa_handler = on_fault };
	int fd, i;

	sigaction(SIGBUS, &sa, NULL);
	fd = open("/dev/mem", O_RDONLY | O_SYNC);
	if (fd < 0) {
		printf("phys=all error=open /dev/mem: %s\n", strerror(errno));
		return;
	}
	for (i = 0; i < n; i++) {
		unsigned long base = addrs[i] & ~(PAGE - 1);
		volatile uint32_t *p;
		void *map;

		map = mmap(NULL, PAGE, PROT_READ, MAP_SHARED, fd, base);
		if (map == MAP_FAILED) {
			printf("phys=0x%lx error=mmap: %s\n", addrs[i], strerror(errno));
			continue;
		}
		p = (volatile uint32_t *)((char *)map + (addrs[i] & (PAGE - 1) & ~3UL));
		if (sigsetjmp(fault_jump, 1) == 0)
			printf("phys=0x%lx value=0x%x\n", addrs[i], *p);
		else
			printf("phys=0x%lx error=SIGBUS\n", addrs[i]);
		munmap(map, PAGE);
	}
	close(fd);
}

static int parse_slot(const char *arg, struct slot *s)
{
	char *end;

	s->gpa = strtoull(arg, &end, 0);
	if (*end != ':')
		return -1;
	s->pages = strtoul(end + 1, &end, 0);
	s->stride = 1;
	if (*end == ':')
		s->stride = strtoul(end + 1, &end, 0);
	return (*end || !s->pages || !s->stride || s->gpa % PAGE) ? -1 : 0;
}

static int usage(const char *prog)
{
	fprintf(stderr, "usage: %s [--vms N] [--vcpus V] [--pages P] [--stride S] [--slot GPA:PAGES[:STRIDE]]... "
		"[--hold SECONDS] [--phys ADDR[:COUNT:STRIDE]]... [--protected] [--pagemap]\n", prog);
	return 2;
}

int main(int argc, char **argv)
{
	int nvms = 1, nvcpus = 1, hold = 0, nslots = 1, nphys = 0, vms[MAX_VMS], vcpus[MAX_VMS][MAX_VCPUS];
	static unsigned long phys[MAX_PHYS];
	struct slot slots[MAX_SLOTS] = { { .gpa = GUEST_BASE, .pages = 4, .stride = 1 } };
	static void *mems[MAX_VMS][MAX_SLOTS];
	int kvm = -1, i, j, k, protected = 0, pagemap = 0;

	for (i = 1; i < argc; i++) {
		if (i + 1 < argc && !strcmp(argv[i], "--vms"))
			nvms = atoi(argv[++i]);
		else if (i + 1 < argc && !strcmp(argv[i], "--vcpus"))
			nvcpus = atoi(argv[++i]);
		else if (i + 1 < argc && !strcmp(argv[i], "--pages"))
			slots[0].pages = strtoul(argv[++i], NULL, 0);
		else if (i + 1 < argc && !strcmp(argv[i], "--stride"))
			slots[0].stride = strtoul(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--protected"))
			protected = 1;
		else if (!strcmp(argv[i], "--pagemap"))
			pagemap = 1;
		else if (i + 1 < argc && !strcmp(argv[i], "--hold"))
			hold = atoi(argv[++i]);
		else if (i + 1 < argc && !strcmp(argv[i], "--slot") && nslots < MAX_SLOTS) {
			if (parse_slot(argv[++i], &slots[nslots++]))
				return usage(argv[0]);
		} else if (i + 1 < argc && !strcmp(argv[i], "--phys")) {
			char *end;
			unsigned long addr = strtoul(argv[++i], &end, 0), count = 1, stride = 0, n;

			if (*end == ':') {
				count = strtoul(end + 1, &end, 0);
				if (*end != ':')
					return usage(argv[0]);
				stride = strtoul(end + 1, &end, 0);
			}
			if (*end || nphys + count > MAX_PHYS)
				return usage(argv[0]);
			for (n = 0; n < count; n++)
				phys[nphys++] = addr + n * stride;
		}
		else
			return usage(argv[0]);
	}
	if (nvms < 0 || nvms > MAX_VMS || nvcpus < 1 || nvcpus > MAX_VCPUS || slots[0].pages < 2 ||
	    !slots[0].stride) {
		fprintf(stderr, "need 0 <= vms <= %d, 1 <= vcpus <= %d, pages >= 2, stride >= 1\n", MAX_VMS, MAX_VCPUS);
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (nphys)
		touch_phys(phys, nphys);
	if (nvms) {
		kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
		if (kvm < 0)
			return fail("open /dev/kvm");
	}
	for (i = 0; i < nvms; i++) {
		uint64_t *table;

		vms[i] = ioctl(kvm, KVM_CREATE_VM, protected ? KVM_VM_TYPE_ARM_PROTECTED : 0);
		if (vms[i] < 0)
			return fail("KVM_CREATE_VM");
		for (k = 0; k < nslots; k++) {
			struct kvm_userspace_memory_region region;

			slots[k].mem = mmap(NULL, slots[k].pages * PAGE, PROT_READ | PROT_WRITE,
					    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (slots[k].mem == MAP_FAILED)
				return fail("mmap guest memory");
			mems[i][k] = slots[k].mem;
			region = (struct kvm_userspace_memory_region){
				.slot = k, .guest_phys_addr = slots[k].gpa, .memory_size = slots[k].pages * PAGE,
				.userspace_addr = (uint64_t)slots[k].mem,
			};
			if (ioctl(vms[i], KVM_SET_USER_MEMORY_REGION, &region))
				return fail("KVM_SET_USER_MEMORY_REGION");
		}
		/* Page 0 of slot 0: the code, then {first GPA, count, stride bytes} per slot, then 0s. */
		memcpy(slots[0].mem, guest_code, sizeof(guest_code));
		table = (uint64_t *)((char *)slots[0].mem + TABLE_OFFSET);
		for (k = 0; k < nslots; k++) {
			unsigned long first = k == 0 ? 1 : 0;

			*table++ = slots[k].gpa + first * PAGE;
			*table++ = (slots[k].pages - first + slots[k].stride - 1) / slots[k].stride;
			*table++ = slots[k].stride * PAGE;
		}
		for (j = 0; j < nvcpus; j++) {
			vcpus[i][j] = create_vcpu(vms[i], j);
			if (vcpus[i][j] < 0)
				return 1;
		}
		for (j = 0; j < nvcpus; j++)
			if (run_vcpu(kvm, vcpus[i][j], j, i))
				return 1;
		for (k = 0; k < nslots; k++)
			if (check_touched(i, k, &slots[k], k == 0 ? 1 : 0, protected))
				return 1;
		if (pagemap && print_pagemap(i, slots, nslots))
			return 1;
	}
	printf("ready vms=%d\n", nvms);
	if (hold > 0)
		sleep(hold);
	/* A VM is destroyed when its last file goes: close the vCPUs first, so "done" follows teardown. */
	for (i = 0; i < nvms; i++) {
		for (j = 0; j < nvcpus; j++)
			close(vcpus[i][j]);
		close(vms[i]);
		for (k = 0; k < nslots; k++)
			munmap(mems[i][k], slots[k].pages * PAGE);
	}
	printf("done\n");
	return 0;
}
