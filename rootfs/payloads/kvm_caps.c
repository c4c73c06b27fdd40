// SPDX-License-Identifier: GPL-2.0
/*
 * kvm_caps: probe /dev/kvm on a pKVM host and print machine-readable key=value lines.
 * Creates one VM with one vCPU and destroys it, so EL2 allocates and frees per-VM state.
 * Exit status: 0 ok, 1 VM or vCPU creation failed, 2 no /dev/kvm.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(void)
{
	int kvm, vm, vcpu;

	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) {
		printf("error=open /dev/kvm: %s\n", strerror(errno));
		return 2;
	}
	printf("api_version=%d\n", ioctl(kvm, KVM_GET_API_VERSION, 0));
	printf("max_vcpus=%d\n", ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_MAX_VCPUS));
	printf("ipa_size=%d\n", ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_ARM_VM_IPA_SIZE));

	vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0) {
		printf("create_vm=%s\n", strerror(errno));
		return 1;
	}
	printf("create_vm=ok\n");
	vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	printf("create_vcpu=%s\n", vcpu >= 0 ? "ok" : strerror(errno));
	if (vcpu >= 0)
		close(vcpu);
	close(vm);
	close(kvm);
	return vcpu >= 0 ? 0 : 1;
}
