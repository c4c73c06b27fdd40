"""Replay on traces made with the model itself: an untouched trace replays clean; one changed
answer is reported as the first divergence with its context."""

from __future__ import annotations

import copy
import random

from harness.el2.trace import Op, SavedPool
from harness.model.buddy import HypPool
from harness.model.replay import replay

BASE, POOL = 0x4000_0000, 0x7F50_0000


def pool_state(m: HypPool) -> SavedPool:
    return SavedPool("hpool", m.range_start, m.range_end, m.max_order, m.free_lists(), m.pages())


def make_trace(seed: int = 7, n: int = 300) -> tuple[dict, list[Op], dict]:
    """Run random calls on a 'kernel' (the model) and record them as the tracer would."""
    rng = random.Random(seed)
    kernel = HypPool(BASE, 200, version="6.12")
    initial = {POOL: pool_state(kernel)}
    ops, live = [], []
    for seq in range(n):
        if live and rng.random() < 0.45:
            pa = live.pop(rng.randrange(len(live)))
            seen = list(kernel.page(pa))
            kernel.put(pa)
            ops.append(Op(seq, 0, POOL, "put", {"addr": pa + 8 * rng.randrange(512)}, seen=seen))  # a PTE address
        else:
            order = rng.choice([0, 0, 0, 1, 2])
            pa = kernel.alloc(order)
            ops.append(Op(seq, rng.randrange(2), POOL, "alloc", {"order": order}, pa))
            if pa is not None:
                if order and rng.random() < 0.3:
                    kernel.split(pa)
                    ops.append(Op(len(ops), 0, None, "split", {"addr": pa}))
                    live += [pa + i * 4096 for i in range(1 << order)]
                else:
                    live.append(pa)
        for i, op in enumerate(ops):
            op.seq = i
    return initial, ops, {POOL: pool_state(kernel)}


def test_a_faithful_trace_replays_clean():
    initial, ops, final = make_trace()
    r = replay(initial, ops, final, "6.12", {POOL: "hpool"})
    assert r.ok and r.ops == len(ops) and r.per_pool["hpool"]["alloc"] > 50


def test_a_changed_alloc_answer_is_the_first_divergence():
    initial, ops, final = make_trace()
    allocs = [op for op in ops if op.op == "alloc" and op.result is not None]
    victim = allocs[len(allocs) // 2]
    bad = copy.deepcopy(ops)
    bad[victim.seq].result = victim.result + 0x1000 * (1 << bad[victim.seq].args["order"])
    r = replay(initial, bad, final, "6.12", {POOL: "hpool"})
    d = r.divergence
    assert d is not None and d.seq == victim.seq and d.pool == "hpool"
    assert f"the kernel returned {bad[victim.seq].result:#x}, the model predicts {victim.result:#x}" in d.reason
    assert 0 < len(d.previous) <= 8 and all(p.startswith("#") for p in d.previous)
    assert int(d.previous[-1].split()[0][1:]) < victim.seq          # they came before it
    assert victim.args["order"] in d.model_lists and d.kernel_lists is not None
    text = d.render()
    assert f"operation #{victim.seq}" in text and "model  free_area" in text and "kernel free_area" in text
    assert victim.result in d.model_lists[victim.args["order"]] or any(   # lists from before the call
        victim.result in blocks for blocks in d.model_lists.values())


def test_a_put_the_model_refuses_is_a_divergence():
    initial, ops, final = make_trace()
    first_alloc = next(op for op in ops if op.op == "alloc" and op.result is not None)
    bad = ops[: first_alloc.seq + 1] + [Op(first_alloc.seq + 1, 0, POOL, "put", {"addr": first_alloc.result}),
                                        Op(first_alloc.seq + 2, 0, POOL, "put", {"addr": first_alloc.result})]
    r = replay(initial, bad, None, "6.12", {POOL: "hpool"})
    assert r.divergence is not None and r.divergence.seq == first_alloc.seq + 2
    assert "refuses" in r.divergence.reason and "BUG_ON" in r.divergence.reason


def test_final_state_differences_are_listed():
    initial, ops, final = make_trace()
    final[POOL].free_lists[0] = list(reversed(final[POOL].free_lists[0]))
    r = replay(initial, ops, final, "6.12", {POOL: "hpool"})
    assert r.divergence is None and any("free_area[0]" in m for m in r.final_mismatches) and not r.ok


def test_pools_created_while_tracing_are_followed_and_dropped_at_teardown():
    vm_pool = 0x4100_1000
    ops = [Op(0, 0, vm_pool, "init", {"pfn": 0x41020, "nr_pages": 16, "reserved_pages": 0}),
           Op(1, 0, vm_pool, "alloc", {"order": 4}, 0x4102_0000),
           Op(2, 0, None, "split", {"addr": 0x4102_0000}),
           *[Op(3 + i, 0, vm_pool, "put", {"addr": 0x4102_0000 + i * 4096}) for i in range(16)],
           Op(19, 0, vm_pool, "alloc", {"order": 0}, 0x4102_0000)]
    r = replay({}, ops, {}, "6.12", {})
    assert r.ok and r.dropped == ["pool@0x41001000"]
    ops[-1].result = 0x4102_1000                   # the kernel would have taken the head of the list
    assert replay({}, ops, {}, "6.12", {}).divergence.seq == 19


def test_a_new_pool_over_a_dead_pools_pages_retires_the_old_model():
    """VM A's PGD pages are reclaimed at teardown and reused as VM B's pool: the split and puts
    after B's init must go to B's model, not to A's."""
    a, b = 0x4100_1000, 0x4200_1000
    lifetime = lambda pool, seq: [                                       # noqa: E731
        Op(seq, 0, pool, "init", {"pfn": 0x42190, "nr_pages": 16, "reserved_pages": 0}),
        Op(seq + 1, 0, pool, "alloc", {"order": 4}, 0x4219_0000),
        Op(seq + 2, 0, None, "split", {"addr": 0x4219_0000}),
        *[Op(seq + 3 + i, 0, pool, "put", {"addr": 0x4219_0000 + i * 4096}) for i in range(16)]]
    r = replay({}, lifetime(a, 0) + lifetime(b, 19), {}, "6.12", {})
    assert r.ok, r.divergence.render() if r.divergence else r.final_mismatches
    assert r.dropped == ["pool@0x41001000", "pool@0x42001000"]


def test_a_page_whose_refcount_differs_at_the_end_fails_the_replay():
    initial, ops, final = make_trace()
    allocated = next(pa for pa, (ref, _) in final[POOL].pages.items() if ref > 0)
    ref, order = final[POOL].pages[allocated]
    final[POOL].pages[allocated] = (ref + 1, order)
    r = replay(initial, ops, final, "6.12", {POOL: "hpool"})
    assert not r.ok and len(r.final_mismatches) == 1 and hex(allocated) in r.final_mismatches[0]


def test_a_reference_missing_from_the_trace_is_named_at_the_next_call_on_that_page():
    """Each get/put carries the kernel's refcount at entry (`seen`): a get recorded twice (or a
    refcount the kernel slipped) shows at the very next call on the page, not at the end."""
    initial, ops, final = make_trace()
    page = next(pa for pa, (ref, _) in final[POOL].pages.items() if ref == 1)
    n = len(ops)
    calls = [Op(n, 0, POOL, "get", {"addr": page + 8}, seen=[1, 0]),
             Op(n + 1, 0, POOL, "get", {"addr": page + 8}, seen=[1, 0])]   # the first never took effect
    r = replay(initial, ops + calls, None, "6.12", {POOL: "hpool"})
    assert r.divergence is not None and r.divergence.seq == n + 1
    assert "had refcount 1 in the kernel at this call, 2 in the model" in r.divergence.reason
    honest = [calls[0], Op(n + 1, 0, POOL, "get", {"addr": page + 8}, seen=[2, 0])]
    assert replay(initial, ops + honest, None, "6.12", {POOL: "hpool"}).divergence is None


# Memcache pages (6.14+): a VM's pool runs dry, guest_s2_zalloc_page() takes a page from the host's
# memcache and sets its refcount to 1 by hand; the traced get/put on it carry `seen`.
VM_POOL, VM_PFN = 0x4100_1000, 0x41020
EXT = 0x4500_0000                                     # far outside the VM's 2-page pool


def memcache_trace(stale_order: int = 0) -> list[Op]:
    p0, p1 = VM_PFN * 4096, VM_PFN * 4096 + 4096
    return [Op(0, 0, VM_POOL, "init", {"pfn": VM_PFN, "nr_pages": 2, "reserved_pages": 0}),
            Op(1, 0, VM_POOL, "alloc", {"order": 0}, p0),     # free_area[1] = [p0] is split
            Op(2, 0, VM_POOL, "alloc", {"order": 0}, p1),
            Op(3, 0, VM_POOL, "alloc", {"order": 0}, None),   # dry: the memcache page comes in
            Op(4, 0, VM_POOL, "get", {"addr": EXT + 0x18}, seen=[1, stale_order]),
            Op(5, 0, VM_POOL, "put", {"addr": EXT + 0x18}, seen=[2, stale_order]),
            Op(6, 0, VM_POOL, "put", {"addr": EXT}, seen=[1, stale_order]),   # freed into the pool
            Op(7, 0, VM_POOL, "alloc", {"order": 0}, EXT),    # the pool hands it out again
            Op(8, 0, None, "split", {"addr": EXT}),
            Op(9, 0, VM_POOL, "put", {"addr": EXT}, seen=[1, 0])]


def memcache_final(ext_state: tuple[int, int] = (0, 0)) -> dict[int, SavedPool]:
    p0, p1 = VM_PFN * 4096, VM_PFN * 4096 + 4096
    return {VM_POOL: SavedPool("vm0", p0, p0 + 2 * 4096, 1, {0: [EXT], 1: []},
                               {p0: (1, 0), p1: (1, 0), EXT: ext_state})}


def test_memcache_pages_are_admitted_with_seen_and_replay_clean():
    for version in ("7.3.4", "6.14"):
        r = replay({}, memcache_trace(), memcache_final(), version, {VM_POOL: "vm0"})
        assert r.ok, (version, r.divergence.render() if r.divergence else r.final_mismatches)
        assert r.per_pool["vm0"] == {"init": 1, "alloc": 4, "get": 1, "put": 3, "split": 1}


def test_a_stale_order_on_a_memcache_page_is_harmless_from_7_2_only():
    r = replay({}, memcache_trace(stale_order=3), memcache_final(), "7.3", {VM_POOL: "vm0"})
    assert r.ok, r.divergence.render() if r.divergence else r.final_mismatches
    # 6.14 frees it at order 3, into a free_area[] the 2-page pool (max_order 1) never initialised.
    r = replay({}, memcache_trace(stale_order=3), memcache_final(), "6.14", {VM_POOL: "vm0"})
    assert r.divergence is not None and r.divergence.seq == 6
    assert "free_area[3] was never initialised" in r.divergence.reason


def test_a_memcache_page_whose_seen_refcount_disagrees_is_named():
    ops = memcache_trace()
    ops[5].seen = [1, 0]                  # the kernel says the get at #4 never took effect
    r = replay({}, ops, memcache_final(), "7.3", {VM_POOL: "vm0"})
    assert r.divergence is not None and r.divergence.seq == 5
    assert f"page {EXT:#x} had refcount 1 in the kernel at this call, 2 in the model" in r.divergence.reason


def test_a_memcache_page_without_seen_is_a_divergence_that_says_so():
    ops = memcache_trace()
    ops[4].seen = None
    r = replay({}, ops, memcache_final(), "7.3", {VM_POOL: "vm0"})
    assert r.divergence is not None and r.divergence.seq == 4
    assert f"page {EXT:#x} is outside the pool and not admitted" in r.divergence.reason
    assert "no `seen`" in r.divergence.reason


def test_admitted_memcache_pages_are_compared_at_the_end():
    r = replay({}, memcache_trace(), memcache_final(ext_state=(0, 3)), "7.3", {VM_POOL: "vm0"})
    assert r.divergence is None and not r.ok
    assert r.final_mismatches == [f"vm0 page {EXT:#x}: model (0, 0), kernel (0, 3)"]


def test_a_snapshot_listing_a_memcache_page_free_starts_the_model_with_it():
    p0 = VM_PFN * 4096
    initial = memcache_final()
    ops = [Op(0, 0, VM_POOL, "alloc", {"order": 0}, EXT),
           Op(1, 0, VM_POOL, "put", {"addr": p0}, seen=[1, 0])]
    final = {VM_POOL: SavedPool("vm0", p0, p0 + 2 * 4096, 1, {0: [p0], 1: []},
                                {p0: (0, 0), p0 + 4096: (1, 0), EXT: (1, 0)})}
    r = replay(initial, ops, final, "7.3", {VM_POOL: "vm0"})
    assert r.ok, r.divergence.render() if r.divergence else r.final_mismatches


def test_a_pool_initialised_again_at_the_same_struct_retires_the_old_model():
    """A torn-down VM's pkvm_hyp_vm pages may come back as the next VM's: its pool struct is then
    at the same address, and the first VM's model retires (it is listed as dropped)."""
    from harness.model.replay import Replayer

    vm_pool = 0x4100_0000
    replayer = Replayer({}, "6.12")
    replayer.feed([Op(0, 0, vm_pool, "init", {"pfn": 0x42000, "nr_pages": 16, "reserved_pages": 0}),
                   Op(1, 0, vm_pool, "alloc", {"order": 0}, 0x4200_0000),
                   Op(2, 0, vm_pool, "init", {"pfn": 0x43000, "nr_pages": 16, "reserved_pages": 0}),
                   Op(3, 0, vm_pool, "alloc", {"order": 0}, 0x4300_0000)])
    assert replayer.divergence is None and replayer.dropped == [f"pool@{vm_pool:#x}"]
