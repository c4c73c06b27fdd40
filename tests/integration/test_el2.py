"""EL2 state read from a live 6.12 pKVM host under QEMU, checked against concrete facts."""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from harness.el2 import decode
from harness.el2 import symbols as ksyms
from harness.el2.image import MemoryImage
from harness.el2.memory import MASK64
from harness.el2.snapshot import NVHE, El2Reader
from harness.image.payloads import GUEST_DIR
from harness.model.invariants import run_checks
from tests.integration.conftest import assembled

PAGE = 4096


@pytest.fixture(scope="module")
def host(cache_dir, kernel, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("el2")
    t = assembled(cache_dir, run_dir).start(run_dir)
    yield t
    t.close()


@pytest.fixture(scope="module")
def reader(host, kernel, cache_dir):
    r = El2Reader(host.qmp_socket, kernel.vmlinux, cache_dir)
    yield r
    r.close()


@pytest.fixture(scope="module")
def snap(reader):
    return reader.snapshot()


def test_snapshot_is_complete_and_fast(snap, kernel):
    assert snap.unavailable == {}
    assert snap.kernel_version == kernel.meta["version"] and snap.kernel_version.startswith("6.12.")
    assert snap.pause_ms < 1000
    assert set(snap.pools) >= {"hpool", "host_s2_pool"}


def test_carveout_matches_dmesg(snap, host):
    m = re.search(r"Reserved (\d+) MiB at (0x[0-9a-f]+)", host.console_text())
    base, size = snap.carveout
    assert (base, size >> 20) == (int(m.group(2), 16), int(m.group(1)))


def test_pools_lie_inside_the_carveout_in_the_documented_order(snap, reader):
    """divide_memory_pool() hands out: vmemmap backing, vm_table, hyp_pgt_base (hpool),
    host_s2_pgt_base (host_s2_pool), with a bump allocator."""
    base, size = snap.carveout
    hp, s2 = snap.pools["hpool"], snap.pools["host_s2_pool"]

    def hyp_var(name: str) -> int:
        return (reader.mem.u64(reader.kpa(NVHE + name)) + snap.hyp_physvirt_offset) & MASK64

    vmemmap, vm_table = hyp_var("vmemmap_base"), hyp_var("vm_table_base")
    assert base <= vmemmap < vm_table < hp.range_start < hp.range_end <= s2.range_start < s2.range_end <= base + size
    assert vm_table + PAGE == hp.range_start == hyp_var("hyp_pgt_base")
    assert hp.range_end == s2.range_start == hyp_var("host_s2_pgt_base")


def test_free_plus_allocated_is_the_pool_size(snap):
    for pool in snap.pools.values():
        allocated = sum(1 for ref, _ in pool.pages.values() if ref > 0)   # from the vmemmap
        assert pool.free_pages + allocated == pool.nr_pages, pool.name
        assert len(pool.pages) == pool.nr_pages and pool.list_errors == []


def test_every_ram_page_has_a_vmemmap_entry(snap):
    base, size, _ = snap.memblocks[0]
    pages = [snap.page(pa) for pa in range(base, base + size, 256 * PAGE)]
    assert len(pages) == size // (256 * PAGE)
    assert all(order != 0xFFFF or ref == 0 for ref, order in pages)
    hyp_vm_free = snap.page(snap.pools["hpool"].range_start)           # the same answer as the pool's
    assert hyp_vm_free == snap.pools["hpool"].pages[snap.pools["hpool"].range_start]


def test_free_list_heads_agree_with_the_vmemmap(snap):
    for pool in snap.pools.values():
        for order, heads in pool.free_lists.items():
            for head in heads:
                assert pool.pages[head] == (0, order), (pool.name, hex(head))
                assert head % (PAGE << order) == 0


def test_every_valid_host_stage2_leaf_is_an_identity_map(snap):
    valid = [leaf for leaf in snap.host_s2.leaves if leaf.valid]
    assert valid and all(leaf.pa == leaf.addr for leaf in valid)
    assert snap.host_s2.errors == []


def test_the_carveout_is_annotated_hyp_owned(snap):
    base, size = snap.carveout
    covered = 0
    for leaf in snap.host_s2.leaves:
        lo, hi = max(leaf.addr, base), min(leaf.addr + leaf.size, base + size)
        if lo < hi:
            assert not leaf.valid and leaf.owner == 1, leaf.describe()
            covered += hi - lo
    assert covered == size


def test_a_vm_shows_up_in_vm_table_with_its_pool_and_goes_away(host, reader, snap):
    assert snap.vms == []
    host.run(f"{GUEST_DIR}/pkvm_guest --vms 1 --pages 4 --hold 8 > /tmp/vm.log 2>&1 &").check()
    deadline = time.monotonic() + 120
    while "ready" not in host.run("cat /tmp/vm.log").stdout:
        assert time.monotonic() < deadline, host.run("cat /tmp/vm.log").stdout
        time.sleep(0.5)
    live = reader.snapshot()
    (vm,) = live.vms
    assert vm.handle == 0x1000 + vm.index and vm.nr_vcpus == 1
    assert vm.pool is not None and live.pools[vm.pool.name] is vm.pool
    assert vm.pgd_phys == vm.pool.range_start                 # the VM's stage-2 PGD is its pool
    assert vm.pool.free_pages == 0 and vm.pool.nr_pages >= 1  # the pool is empty until teardown
    diff = live.diff(snap)
    assert diff.pools_added == [vm.pool.name]
    while "done" not in host.run("cat /tmp/vm.log").stdout:
        assert time.monotonic() < deadline + 60
        time.sleep(0.5)
    assert reader.snapshot().vms == []


def test_model_invariants_hold_on_the_live_hypervisor(host, reader):
    """The model's checks on real snapshots: after boot, and with two VMs alive."""
    assert run_checks(reader.snapshot()) == []
    host.run(f"{GUEST_DIR}/pkvm_guest --vms 2 --pages 8 --hold 6 > /tmp/inv.log 2>&1 &").check()
    deadline = time.monotonic() + 120
    while "ready" not in host.run("cat /tmp/inv.log").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    live = reader.snapshot()
    assert len(live.vms) == 2 and run_checks(live) == []
    while "done" not in host.run("cat /tmp/inv.log").stdout:
        assert time.monotonic() < deadline + 60
        time.sleep(0.5)
    assert run_checks(reader.snapshot()) == []


def test_a_missing_symbol_or_struct_is_reported_not_fatal(reader):
    saved_sym = reader.kernel.symbols.pop(NVHE + "vm_table")
    saved_struct = reader.kernel.structs.pop("memblock_region")
    try:
        s = reader.snapshot()
    finally:
        reader.kernel.symbols[NVHE + "vm_table"] = saved_sym
        reader.kernel.structs["memblock_region"] = saved_struct
    assert "vm_table" in s.unavailable and "memblocks" in s.unavailable
    assert "memblock_region" in s.unavailable["memblocks"]
    assert s.pools["hpool"].nr_pages > 0 and s.host_s2.leaves             # the rest is still there


def test_a_held_pool_lock_is_detected(reader, snap):
    pool_t = reader.kernel.struct("hyp_pool")

    def fake(owner: int, nxt: int):
        values = {pool_t.offset("lock.owner"): owner, pool_t.offset("lock.next"): nxt}
        return lambda pa, size: values[pa].to_bytes(size, "little")

    assert decode.lock_held(fake(3, 4), 0, pool_t)       # a ticket taken, not yet released
    assert not decode.lock_held(fake(4, 4), 0, pool_t)


def test_the_recorded_reads_decode_offline_to_the_same_snapshot(host, reader):
    """The live snapshot and an offline decoding of the pages it read (through a saved and
    reloaded image) agree on everything, with a VM alive so vm_table and a VM pool are read."""
    host.run(f"{GUEST_DIR}/pkvm_guest --vms 1 --pages 4 --hold 8 > /tmp/img.log 2>&1 &").check()
    deadline = time.monotonic() + 120
    while "ready" not in host.run("cat /tmp/img.log").stdout:
        assert time.monotonic() < deadline, host.run("cat /tmp/img.log").stdout
        time.sleep(0.5)
    live, image = reader.snapshot_and_image()
    offline = MemoryImage.from_bytes(image.to_bytes()).decode()
    assert live.vms and live.unavailable == {}
    assert offline.to_dict() == live.to_dict()
    for name, pool in live.pools.items():
        assert offline.pools[name].pages == pool.pages, name
    assert offline.host_s2.leaves == live.host_s2.leaves and offline.hyp_s1.leaves == live.hyp_s1.leaves
    assert len(image.to_bytes()) < 1 << 20
    while "done" not in host.run("cat /tmp/img.log").stdout:
        assert time.monotonic() < deadline + 60
        time.sleep(0.5)


def _gdb_ptype(vmlinux, struct: str) -> dict[str, tuple[int, int]]:
    """Offsets and sizes of a struct's top-level members, from gdb's own DWARF reader.

    `ptype /o` prints "/* offset | size */ type name;" per member; a nested struct member opens
    with "/* offset | size */ struct x {" and is named on its closing "} name;" line.
    """
    out = subprocess.run(["gdb-multiarch", "-batch", "-nx", "-ex", f"ptype /o struct {struct}", str(vmlinux)],
                         capture_output=True, text=True, timeout=300).stdout
    fields: dict[str, tuple[int, int]] = {}
    depth, pending = 0, None
    for line in out.splitlines():
        m = re.match(r"/\*\s+(\d+)(?::\s*\d+)?\s*\|\s*(\d+)\s*\*/\s*(.*)$", line.strip())
        body = m.group(3) if m else line.strip()
        if depth == 1 and m and body.endswith("{"):
            pending = (int(m.group(1)), int(m.group(2)))
        elif depth == 1 and m:
            name = re.findall(r"(\w+)(?:\[\d+\])*\s*(?::\s*\d+)?;$", body)
            if name:
                fields[name[-1]] = (int(m.group(1)), int(m.group(2)))
        elif depth == 2 and pending and (close := re.match(r"}\s*(\w+)(?:\[\d+\])*;$", body)):
            fields[close.group(1)] = pending
            pending = None
        depth += body.count("{") - body.count("}")
    return fields


@pytest.mark.parametrize("struct", ["hyp_pool", "hyp_page", "memblock_region", "kvm_pgtable", "host_mmu",
                                    "kvm_s2_mmu", "pkvm_hyp_vm"])
def test_dwarf_layouts_agree_with_gdb(kernel, struct):
    ours = ksyms.load(kernel.vmlinux).struct(struct)     # parsed afresh, not from the cache
    theirs = _gdb_ptype(kernel.vmlinux, struct)
    assert theirs, f"gdb printed no layout for struct {struct}"
    for name, (offset, size) in theirs.items():
        assert (ours.offset(name), ours.field(name).size) == (offset, size), name


def test_a_host_fault_maps_what_the_stage2_model_predicts(host, reader):
    """Touch an untouched high MMIO address (QEMU virt's 512 GiB PCIe window) from the host and
    compare the new host stage-2 mapping and the pool cost with the model's prediction. On 6.12
    this shows the adjust-range quirk: a whole 512 GiB range, as 512 1 GiB blocks."""
    from harness.model.stage2 import Region, host_s2_memattr, predict_from_tables

    before = reader.snapshot()
    addr = 0x80_0000_1000
    regions = [Region(base, size) for base, size, _ in before.memblocks]
    want = predict_from_tables(addr, regions, before.host_s2, reader.kernel.kernel_version)
    host.run(f"devmem {addr:#x} 32").check()
    after = reader.snapshot()
    new = [leaf for leaf in after.diff(before).s2_added if want.start <= leaf.addr < want.start + want.size]
    assert len(new) == want.leaves and {leaf.level for leaf in new} == {want.leaf_level}
    assert min(leaf.addr for leaf in new) == want.start
    assert sum(leaf.size for leaf in new) == want.size
    memattr = host_s2_memattr(reader.kernel.kernel_version, fwb=False)     # 6.12: MT_S2_NORMAL, FWB or not
    assert all(leaf.valid and leaf.xn != want.is_memory and leaf.memattr == memattr for leaf in new)
    assert after.diff(before).pools["host_s2_pool"].free_pages_delta == -want.table_pages
    assert (want.size, want.leaves, want.table_pages) == (512 << 30, 512, 1)    # the 6.12 quirk, for real
    assert run_checks(after) == []
