"""KVM selftest guest modes are named in rootfs/kvm-selftests.txt and numbered per kernel: the
enum gained P52V48_16K in second place after 6.1, so `-m 6` was a 16K mode on 6.1 (which
cortex-a72 cannot run) and the 40-bit 4K mode on 6.12."""

from __future__ import annotations

import pytest

from harness.image.payloads import guest_modes, resolve_guest_modes, selftest_lines

ENUM_6_1 = """
enum vm_guest_mode {
	VM_MODE_P52V48_4K,
	VM_MODE_P52V48_64K,
	VM_MODE_P48V48_4K,
	VM_MODE_P48V48_16K,
	VM_MODE_P48V48_64K,
	VM_MODE_P40V48_4K,
	VM_MODE_P40V48_16K,
	VM_MODE_PXXV48_4K,	/* For 48bits VA but ANY bits PA */
	NUM_VM_MODES,
};
"""


def test_the_enum_is_read_from_kvm_util_base_h_before_6_9(tmp_path):
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "kvm_util_base.h").write_text(ENUM_6_1)
    modes = guest_modes(tmp_path)
    assert modes[:3] == ["P52V48_4K", "P52V48_64K", "P48V48_4K"] and modes[-1] == "PXXV48_4K"
    assert resolve_guest_modes("-m P40V48_4K -b 16M", modes) == "-m 5 -b 16M"


def test_names_resolve_per_kernel_and_an_unknown_mode_is_an_error():
    modes_6_12 = ["P52V48_4K", "P52V48_16K", "P52V48_64K", "P48V48_4K", "P48V48_16K", "P48V48_64K",
                  "P40V48_4K"]
    assert resolve_guest_modes("-m P40V48_4K -v 2", modes_6_12) == "-m 6 -v 2"
    assert resolve_guest_modes("-b 16M -v 2", modes_6_12) == "-b 16M -v 2"
    with pytest.raises(ValueError, match="P99V48_4K is not among"):
        resolve_guest_modes("-m P99V48_4K", modes_6_12)


def test_the_selftest_list_names_its_modes():
    assert all("-m " not in t.args or "-m P" in t.args for t in selftest_lines())
