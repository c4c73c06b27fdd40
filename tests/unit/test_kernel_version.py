"""KernelVersion: parsing, ordering, and each version fact at the release where it changed."""

from __future__ import annotations

import pytest

from harness.kernel.version import MODEL_REFERENCE, NEWEST_READ, KernelVersion

V = KernelVersion.parse


@pytest.mark.parametrize("text,want", [
    ("6.12", (6, 12, 0)), ("6.12.117", (6, 12, 117)), ("v6.1.192", (6, 1, 192)),
    ("6.13.0-rc1+", (6, 13, 0)), ("5.14.21", (5, 14, 21)), (" 7.0 ", (7, 0, 0)),
])
def test_parse(text, want):
    assert V(text).tuple == want


@pytest.mark.parametrize("text", ["banana", "", "6", "unknown", "v"])
def test_garbage_does_not_parse(text):
    with pytest.raises(ValueError, match="cannot parse kernel version"):
        V(text)


def test_str_series_and_order():
    assert str(V("6.12")) == "6.12" and str(V("6.12.117")) == "6.12.117" and str(V("v6.1.192")) == "6.1.192"
    assert V("6.12.117").series == "6.12" and V("6.13.0-rc1+").series == "6.13"
    assert V("6.9") < V("6.10") < V("6.10.1") < V("7.0") and V("6.12") == KernelVersion(6, 12, 0)
    assert V("6.4").at_least(6, 4) and not V("6.3.99").at_least(6, 4) and V("7.0").at_least(6, 16)
    assert sorted([V("6.12"), V("5.15"), V("6.1.192")]) == [V("5.15"), V("6.1.192"), V("6.12")]


def test_of_takes_a_version_a_string_or_a_tuple():
    kv = KernelVersion(6, 12, 117)
    assert KernelVersion.of(kv) is kv
    assert KernelVersion.of("6.12.117") == kv and KernelVersion.of((6, 12, 117)) == kv
    assert KernelVersion.of((6, 12)) == KernelVersion(6, 12)
    for bad in ("banana", (6,), (6, 1, 2, 3), 6.12, None):
        with pytest.raises(ValueError):
            KernelVersion.of(bad)


def test_reference_releases():
    assert MODEL_REFERENCE == KernelVersion(6, 12) and str(MODEL_REFERENCE) == "6.12"
    assert NEWEST_READ.series == "7.3"


# (property, last release without it, first release with it)
BOOLEAN_FACTS = [
    ("has_pkvm", "5.12", "5.13"),
    ("has_vm_table", "6.1.192", "6.2"),
    ("has_host_mmu", "6.1", "6.2"),
    ("hyp_vmemmap_covers_all_memory", "6.1", "6.2"),
    ("reserves_ffa_proxy", "6.1", "6.2"),
    ("free_lists_include_max_order", "6.3", "6.4"),
    ("has_hvhe", "6.5", "6.6"),
    ("hyp_page_order_is_u8", "6.13", "6.14"),
    ("stage2_adjust_range_checks_chosen_level", "6.15", "6.16"),
    ("stage2_falls_back_to_page", "6.19", "7.0"),
]


@pytest.mark.parametrize("fact,before,since", BOOLEAN_FACTS)
def test_each_fact_changes_at_its_release(fact, before, since):
    assert getattr(V(before), fact) is False
    assert getattr(V(since), fact) is True
    assert getattr(V(since + ".5" if since.count(".") == 1 else since), fact) is True
    assert getattr(V("7.3"), fact) is True


def test_kvm_pgtable_levels():
    assert (V("6.6").kvm_pgtable_levels, V("6.7").kvm_pgtable_levels) == (4, 5)
    assert V("6.1").kvm_pgtable_levels == 4 and V("6.12.117").kvm_pgtable_levels == 5


def test_selftests_arch():
    assert V("6.12.117").selftests_arch == "aarch64" and V("6.1").selftests_arch == "aarch64"
    assert V("6.13").selftests_arch == "arm64" and V("6.13.0-rc1+").selftests_arch == "arm64"
    assert V("7.3.4").selftests_arch == "arm64"


def test_selftest_names_are_spelt_as_each_tree_does():
    from harness.image.payloads import selftest_names, tree_path

    assert tree_path("arm64/hypercalls", V("6.12.117")) == "aarch64/hypercalls"
    assert tree_path("arm64/hypercalls", V("7.3.4")) == "arm64/hypercalls"
    assert tree_path("kvm_create_max_vcpus", V("6.1")) == "kvm_create_max_vcpus"
    assert not [n for n in selftest_names() if n.startswith("aarch64/")]     # the list uses one spelling


@pytest.mark.parametrize("version,rules", [
    ("5.10", "5.13"), ("5.13", "5.13"), ("5.14", "5.14"), ("5.14.14", "5.14"), ("5.14.15", "5.15"),
    ("5.16", "5.15"), ("5.17", "5.17+"), ("6.1.192", "5.17+"), ("6.2", "6.2+"), ("6.3", "6.2+"),
    ("6.4", "6.4+"), ("6.13", "6.4+"), ("6.14", "6.14+"), ("6.17.9", "6.14+"), ("6.18", "6.14+"),
    ("7.1.5", "6.14+"), ("7.2", "7.2+"), ("7.2.13", "7.2+"), ("7.3.4", "7.2+"), ("8.0", "7.2+"),
])
def test_buddy_rules_boundaries(version, rules):
    assert V(version).buddy_rules == rules


def test_buddy_rules_warnings():
    assert V("5.12").buddy_rules_warning and "did not exist" in V("5.12").buddy_rules_warning
    assert V("5.13").buddy_rules_warning is None and V("5.14.14").buddy_rules_warning is None
    assert "5.14.15" in V("5.14.15").buddy_rules_warning
    assert V("6.12.117").buddy_rules_warning is None and V("6.17.9").buddy_rules_warning is None
    assert "newer than the newest tree read (7.3)" in V("7.4").buddy_rules_warning
    assert "assuming the 7.2+ allocator" in V("8.0").buddy_rules_warning


@pytest.mark.parametrize("version", ["6.18", "6.19.2", "7.0", "7.1.9"])
def test_buddy_rules_warning_for_the_unread_6_18_to_7_1(version):
    w = V(version).buddy_rules_warning
    assert w is not None and f"{V(version).series} was not read" in w
    assert "assuming the 6.14+ rules" in w and "known in 7.2 and absent in 6.17" in w


@pytest.mark.parametrize("version", ["6.17", "7.2", "7.2.13", "7.3", "7.3.4", "6.12"])
def test_no_buddy_rules_warning_for_trees_read(version):
    assert V(version).buddy_rules_warning is None


def test_external_pages_freed_at_order_0_from_7_2():
    assert V("7.2").external_pages_freed_at_order_0 and V("7.3.4").external_pages_freed_at_order_0
    assert not V("7.1.9").external_pages_freed_at_order_0 and not V("6.17").external_pages_freed_at_order_0


def test_hyp_page_shapes():
    assert KernelVersion.first_with_hyp_page_shape(32, 32) == KernelVersion(5, 13)
    assert KernelVersion.first_with_hyp_page_shape(16, 8) == KernelVersion(6, 14)
    assert KernelVersion.first_with_hyp_page_shape(16, 16) is None
    assert KernelVersion.first_with_hyp_page_shape(None, None) is None


def test_series_ranges_as_data_files_write_them():
    assert V("7.3.4").in_series_range("7.3+") and not V("6.12.117").in_series_range("7.3+")
    assert V("6.12.117").in_series_range("-6.12") and not V("6.13").in_series_range("-6.12")
    assert V("6.14").in_series_range("6.2-7.1") and not V("7.2").in_series_range("6.2-7.1")
    assert V("6.1.192").in_series_range("6.1") and not V("6.12").in_series_range("6.1")
    for bad in ("banana+", "7.3.1+", "6.x-7"):
        with pytest.raises(ValueError):
            V("7.3").in_series_range(bad)


def test_a_selftest_listed_for_a_range_runs_only_there_and_fails_where_it_says():
    from harness.image.payloads import selftest_lines, selftest_names

    (set_id_regs,) = [t for t in selftest_lines() if t.name == "arm64/set_id_regs"]
    assert set_id_regs.kernels == "6.12+" and set_id_regs.runs_on(V("7.3.4")) and not set_id_regs.runs_on(V("6.1.192"))
    assert "arm64/set_id_regs" not in selftest_names(V("6.1.192")) and "arm64/set_id_regs" in selftest_names(V("7.3"))
    assert set_id_regs.fails_on(V("6.12.117")) and set_id_regs.fails_on(V("7.2.13"))
    assert not set_id_regs.fails_on(V("7.3.4"))
    (vgic_init,) = [t for t in selftest_lines() if t.name == "arm64/vgic_init"]
    assert vgic_init.xfail == "" and vgic_init.fails_on(V("7.3.4")) and vgic_init.fails_on(V("6.12.117"))
    assert all(t.xfail is None for t in selftest_lines() if t.name == "steal_time")
