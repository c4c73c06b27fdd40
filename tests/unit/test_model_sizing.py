"""kvm_hyp_reserve()'s arithmetic, checked against what 6.12 printed on QEMU (1 GiB at 1 GiB:
"Reserved 10 MiB", tests/golden/boot-max-hvhe.log) and worked by hand."""

import pytest

from harness.kernel.version import KernelVersion
from harness.model.sizing import FFA_PROXY_PAGES, hyp_reserve


def test_one_gib_of_ram_at_one_gib_reserves_10_mib_on_6_12():
    r = hyp_reserve([(0x4000_0000, 1 << 30)], KernelVersion(6, 12), 4)
    # per 1 GiB at page granularity over 5 levels: 512 + 1 + 1 + 1 + 1 = 516 table pages
    assert (r.hyp_s1, r.host_s2, r.vm_table, r.vmemmap, r.ffa_proxy) == (1032, 1048, 1, 256, FFA_PROXY_PAGES)
    assert FFA_PROXY_PAGES == 11 and r.pages == 2348
    assert r.mib == 10          # 9.17 MiB rounded up to 2 MiB


def test_split_memblocks_cost_more_tables_and_vmemmap_pages():
    one = hyp_reserve([(0x4000_0000, 1 << 30)], KernelVersion(6, 12), 4)
    two = hyp_reserve([(0x4000_0000, 512 << 20), (0x6000_1000, (512 << 20) - 4096)], KernelVersion(6, 12), 4)
    assert two.hyp_s1 > one.hyp_s1 and two.vmemmap >= one.vmemmap


def test_four_levels_before_lpa2():
    assert hyp_reserve([(0x4000_0000, 1 << 30)], KernelVersion(6, 6), 4).hyp_s1 == 2 * (512 + 1 + 1 + 1)


def test_6_1_backs_only_the_carveout_with_vmemmap_and_has_no_vm_table_or_ffa():
    r = hyp_reserve([(0x4000_0000, 1 << 30)], KernelVersion(6, 1), 4)
    # 515 table pages per GiB over 4 levels; the vmemmap fixed point: 2076 pages -> 3 vmemmap
    # pages (4 bytes each), 7 with the 4 table pages that map them, and 2083 * 4 bytes still fit 3 pages
    assert (r.hyp_s1, r.host_s2, r.vm_table, r.vmemmap, r.ffa_proxy) == (1030, 1046, 0, 7, 0)
    assert r.mib == 10


def test_before_pkvm_is_refused():
    with pytest.raises(ValueError, match="came with 5.13"):
        hyp_reserve([(0x4000_0000, 1 << 30)], KernelVersion(5, 12), 4)
