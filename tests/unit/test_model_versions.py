"""6.1 and 6.12 rules on the same pool: a pool of exactly 2^k pages. hyp_pool_init stores a
different max_order (6.1: min(MAX_ORDER, get_order((n + 1) << PAGE_SHIFT)), exclusive; 6.12:
min(MAX_PAGE_ORDER, get_order(n << PAGE_SHIFT)), inclusive), while the largest block either can
form is the same order-k block. tests/integration/test_kernel_6_1.py checks each prediction
against its own kernel's hpool, sized to 1024 pages on a live boot."""

from __future__ import annotations

import pytest

from harness.kernel.version import KernelVersion
from harness.model.buddy import HypPool, version_rules
from harness.model.invariants import choose_rules
from harness.model.sizing import memory_for_hpool_pages

BASE = 0x4000_0000


@pytest.mark.parametrize("k", range(1, 11))
def test_a_2k_pool_stores_k_plus_1_on_6_1_and_k_on_6_12(k):
    n = 1 << k
    assert version_rules("6.1.192").max_order(n) == k + 1
    assert version_rules("6.12.117").max_order(n) == k
    assert (version_rules("6.1").name, version_rules("6.12").name) == ("5.17+", "6.4+")


@pytest.mark.parametrize("version", ["6.1.192", "6.12.117"])
def test_both_rule_sets_form_the_one_order_k_block_and_nothing_larger(version):
    pool = HypPool(BASE, 1 << 10, version=version)

    def listed() -> dict[int, list[int]]:
        return {order: heads for order, heads in pool.free_lists().items() if heads}

    assert listed() == {10: [BASE]}
    assert pool.alloc(10) == BASE and pool.alloc(0) is None
    pool.put(BASE)
    assert listed() == {10: [BASE]}


def test_a_non_power_of_two_pool_below_1024_pages_is_the_same_on_both():
    for n in (3, 100, 513, 1000):
        assert version_rules("6.1").max_order(n) == version_rules("6.12").max_order(n)


def test_the_rules_are_chosen_from_the_kernel_and_said_so():
    rules = choose_rules("6.1.192", {"size": 4, "refcount_bits": 16, "order_bits": 16})
    assert rules.name == "5.17+" and rules.warning is None and "6.1" in rules.covers


def test_memory_sizes_that_make_hpool_exactly_1024_pages():
    assert memory_for_hpool_pages(1024, KernelVersion(6, 1)) == 1011         # 506 + 1 + 1 + 1 + 515
    assert memory_for_hpool_pages(1024, KernelVersion(6, 12)) == 1007        # 504 + 1 + 1 + 1 + 1 + 516
