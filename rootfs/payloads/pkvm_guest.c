// SPDX-License-Identifier: GPL-2.0
/*
 * pkvm_guest: run tiny guests on a pKVM host so that EL2 creates, maps and tears down VMs.
 *
 *   pkvm_guest [--vms N] [--vcpus V] [--pages P] [--hold SECONDS]
 *
 * Each VM has one memslot of P pages at GUEST_BASE and V vCPUs. Every vCPU runs the same code:
 * it stores to each of the P-1 data pages (so each page is faulted into the guest stage-2),
 * then stores to an unmapped address, which exits to the host as MMIO. In 6.12 the hyp VM is
 * created at EL2 on the first KVM_RUN, so after "ready" every VM is in EL2's vm_table.
 * The VMs are kept for --hold seconds, then closed (EL2 tears them down).
 *
 * Output, one record per line: "vm=I vcpu=J exit=mmio addr=0x...", "ready vms=N", "done".
 * Exit status: 0 ok, 1 a KVM call failed (the line "error=..." says which), 2 bad usage.
 */
#include <errno.h>
#include <fcntl.h>
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
#define MAX_VMS 64
#define MAX_VCPUS 64

/* x0 = first data page, x1 = data pages, x2 = MMIO address */
static const uint32_t guest_code[] = {
	0xB40000A1, /* loop: cbz  x1, out          */
	0xF9000001, /*       str  x1, [x0]         */
	0x91400400, /*       add  x0, x0, #4096    */
	0xD1000421, /*       sub  x1, x1, #1       */
	0x17FFFFFC, /*       b    loop             */
	0xF900005F, /* out:  str  xzr, [x2]        */
	0x14000000, /*       b    .                */
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
static int create_vcpu(int vm, int index, unsigned long pages)
{
	struct kvm_vcpu_init init;
	int vcpu;

	vcpu = ioctl(vm, KVM_CREATE_VCPU, index);
	if (vcpu < 0)
		return -fail("KVM_CREATE_VCPU");
	if (ioctl(vm, KVM_ARM_PREFERRED_TARGET, &init) || ioctl(vcpu, KVM_ARM_VCPU_INIT, &init))
		return -fail("KVM_ARM_VCPU_INIT");
	if (set_reg(vcpu, CORE_REG(regs.pc), GUEST_BASE) ||
	    set_reg(vcpu, CORE_REG(regs.regs[0]), GUEST_BASE + PAGE) ||
	    set_reg(vcpu, CORE_REG(regs.regs[1]), pages - 1) ||
	    set_reg(vcpu, CORE_REG(regs.regs[2]), MMIO_ADDR))
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

int main(int argc, char **argv)
{
	int nvms = 1, nvcpus = 1, hold = 0, vms[MAX_VMS], vcpus[MAX_VCPUS];
	unsigned long pages = 4;
	int kvm, i, j;

	for (i = 1; i < argc; i++) {
		if (i + 1 < argc && !strcmp(argv[i], "--vms"))
			nvms = atoi(argv[++i]);
		else if (i + 1 < argc && !strcmp(argv[i], "--vcpus"))
			nvcpus = atoi(argv[++i]);
		else if (i + 1 < argc && !strcmp(argv[i], "--pages"))
			pages = strtoul(argv[++i], NULL, 0);
		else if (i + 1 < argc && !strcmp(argv[i], "--hold"))
			hold = atoi(argv[++i]);
		else {
			fprintf(stderr, "usage: %s [--vms N] [--vcpus V] [--pages P] [--hold SECONDS]\n", argv[0]);
			return 2;
		}
	}
	if (nvms < 1 || nvms > MAX_VMS || nvcpus < 1 || nvcpus > MAX_VCPUS || pages < 2) {
		fprintf(stderr, "need 1 <= vms <= %d, 1 <= vcpus <= %d, pages >= 2\n", MAX_VMS, MAX_VCPUS);
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		return fail("open /dev/kvm");
	for (i = 0; i < nvms; i++) {
		struct kvm_userspace_memory_region slot;
		void *mem;

		vms[i] = ioctl(kvm, KVM_CREATE_VM, 0);
		if (vms[i] < 0)
			return fail("KVM_CREATE_VM");
		mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (mem == MAP_FAILED)
			return fail("mmap guest memory");
		memcpy(mem, guest_code, sizeof(guest_code));
		slot = (struct kvm_userspace_memory_region){
			.slot = 0, .guest_phys_addr = GUEST_BASE, .memory_size = pages * PAGE,
			.userspace_addr = (uint64_t)mem,
		};
		if (ioctl(vms[i], KVM_SET_USER_MEMORY_REGION, &slot))
			return fail("KVM_SET_USER_MEMORY_REGION");
		for (j = 0; j < nvcpus; j++) {
			vcpus[j] = create_vcpu(vms[i], j, pages);
			if (vcpus[j] < 0)
				return 1;
		}
		for (j = 0; j < nvcpus; j++)
			if (run_vcpu(kvm, vcpus[j], j, i))
				return 1;
	}
	printf("ready vms=%d\n", nvms);
	if (hold > 0)
		sleep(hold);
	for (i = 0; i < nvms; i++)
		close(vms[i]);
	printf("done\n");
	return 0;
}
