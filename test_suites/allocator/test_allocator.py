"""Allocator suite: drive the real EL2 buddy allocator through VM lifecycles and judge it with
the model's invariants, the pools' baselines and differential replay of every traced call.

What each check catches (see tests/mutants/ and `make test-mutants`):
- invariants (harness.model.invariants): broken free lists, missed coalescing, leaked pages,
  pages outside their pool, table pages not owned by their pool;
- baselines: a page not given back at VM teardown (hpool's free pages per order must return);
- replay: an allocation answer the buddy rules do not give (wrong list end, max_order), a
  refcount that slips (each get/put is checked against the kernel's hyp_page).
"""

from __future__ import annotations

import random

import pytest

from harness.model.invariants import run_checks
from harness.targets.guests import BackgroundGuests, guest_args, run_guests

pytestmark = pytest.mark.needs_el2


def _render(findings) -> str:
    return "\n".join(str(f) for f in findings)


def _replayed(box) -> None:
    r = box.result
    assert r.divergence is None, r.divergence.render()
    assert r.final_mismatches == [], "\n".join(r.final_mismatches[:10])


def _hpool_free(snap) -> dict[int, int]:
    return snap.pools["hpool"].free_per_order()


@pytest.fixture(scope="module")
def warmed(target, payload):
    """One VM lifecycle first: the host's first VM maps hyp structures that stay (per-CPU data,
    the vm_table page), so baselines are taken after it."""
    run_guests(target, payload("pkvm_guest"), guest_args(vms=1, vcpus=2, pages=8))


def test_every_invariant_holds_after_boot(el2):
    snap = el2.snapshot()
    assert snap.unavailable == {}
    findings = run_checks(snap)
    assert findings == [], _render(findings)


@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_vm_lifecycles_return_every_pool_to_its_baseline(target, payload, el2, el2_trace, warmed, vcpus):
    before = el2.snapshot()
    with el2_trace() as box:
        for _ in range(2):
            run_guests(target, payload("pkvm_guest"), guest_args(vms=1, vcpus=vcpus, pages=16))
    after = el2.snapshot()
    _replayed(box)
    assert box.result.per_pool.get("hpool") and len(box.result.dropped) == 2     # two VM pools, torn down
    findings = run_checks(after)
    assert findings == [], _render(findings)
    assert after.vms == [] and set(after.pools) == {"hpool", "host_s2_pool"}
    assert _hpool_free(after) == _hpool_free(before), "hpool pages not given back after the VMs were destroyed"


def test_many_vms_alive_at_once_press_hpool(target, payload, el2, warmed):
    before = el2.snapshot()
    guests = BackgroundGuests(target, payload("pkvm_guest"), guest_args(vms=12, vcpus=1, pages=4, hold=4))
    guests.wait("ready")
    live = el2.snapshot()
    assert len(live.vms) == 12 and all(vm.pool is not None for vm in live.vms)
    assert live.pools["hpool"].free_pages < before.pools["hpool"].free_pages      # hyp stage-1 grew
    findings = run_checks(live)
    assert findings == [], _render(findings)
    guests.wait("done")
    after = el2.snapshot()
    findings = run_checks(after)
    assert findings == [], _render(findings)
    assert after.vms == []
    assert _hpool_free(after) == _hpool_free(before), "hpool free pages per order not back to the baseline"


def test_a_randomized_workload_replays_exactly(target, payload, el2, el2_trace, warmed, seed):
    """VM counts, vCPU counts, memslot layouts and touched pages drawn from `seed`; replay with --seed."""
    rng = random.Random(seed)

    def extra_slots() -> tuple[tuple[int, int, int], ...]:
        gpas = rng.sample([0x8000_0000, 0x9000_0000, 0x1_0000_0000, 0x2_4020_0000], rng.randint(0, 2))
        return tuple((gpa, rng.choice([1, 8, 64, 512]), rng.choice([1, 2, 7])) for gpa in gpas)

    steps = [guest_args(vms=rng.randint(1, 4), vcpus=rng.randint(1, 3), pages=rng.choice([2, 4, 16, 64]),
                        stride=rng.choice([1, 1, 3]), slots=extra_slots())
             for _ in range(rng.randint(3, 5))]
    before = el2.snapshot()
    with el2_trace() as box:
        for args in steps:
            run_guests(target, payload("pkvm_guest"), args)
    print("steps: " + " | ".join(steps))
    _replayed(box)
    after = el2.snapshot()
    findings = run_checks(after)
    assert findings == [], f"seed {seed}: " + _render(findings)
    assert after.vms == [] and _hpool_free(after) == _hpool_free(before), f"seed {seed}"
