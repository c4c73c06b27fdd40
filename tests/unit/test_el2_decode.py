"""The EL2 decoders (harness.el2.decode) offline, on memory images recorded from live boots.

Each tests/golden/el2-image-<series>/ holds the pages one live snapshot's decoding read
(image.el2img), that live snapshot's to_dict() (snapshot.json) and what to_dict() leaves out
(facts.json); tests/golden/record_el2_image.py makes them. Decoding the image here must give the
live snapshot back, field by field; a damaged image must be reported, never decoded to a wrong
value.
"""

from __future__ import annotations

import json
import lzma
import struct
from functools import cache
from pathlib import Path

import pytest

from harness.el2 import decode
from harness.el2.image import BadImage, MemoryImage, MissingPage, RecordingReader, snapshot_facts
from harness.el2.pgtable import PAGE_SIZE
from harness.el2.state import Snapshot
from harness.kernel.version import KernelVersion

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
SERIES = sorted(p.name.removeprefix("el2-image-") for p in GOLDEN.glob("el2-image-*") if (p / "image.el2img").is_file())
MASK64 = (1 << 64) - 1


@cache
def image(series: str) -> MemoryImage:
    return MemoryImage.load(GOLDEN / f"el2-image-{series}" / "image.el2img")


@cache
def golden(series: str, name: str) -> dict:
    return json.loads((GOLDEN / f"el2-image-{series}" / name).read_text())


@cache
def decoded(series: str) -> Snapshot:
    return image(series).decode()


def as_json(value: object) -> object:
    """The value as it reads back from the golden JSON (tuples as lists, int keys as strings)."""
    return json.loads(json.dumps(value, sort_keys=True))


@pytest.fixture(params=SERIES)
def series(request) -> str:
    return request.param


def test_the_6_12_image_is_there():
    assert "6.12" in SERIES, "tests/golden/el2-image-6.12 is missing: run tests/golden/record_el2_image.py"


def test_an_image_is_small_and_its_kernel_layout_trimmed(series):
    path = GOLDEN / f"el2-image-{series}" / "image.el2img"
    assert path.stat().st_size < 512 << 10
    img = image(series)
    assert set(img.kernel.symbols) <= set(decode.used_symbols())
    assert set(img.kernel.structs) <= set(decode.STRUCTS)
    assert KernelVersion.parse(img.kernel_version).series == series


# --- the decoded image is the live snapshot --------------------------------------------------------

TOP_LEVEL = ["kernel_version", "taken_at", "pause_ms", "attempts", "kimage_voffset", "hyp_physvirt_offset",
             "carveout", "memblocks", "lpa2", "vms", "hyp_s1", "unavailable", "absent"]


@pytest.mark.parametrize("key", TOP_LEVEL)
def test_each_top_level_field_is_what_the_live_reader_saw(series, key):
    assert as_json(decoded(series).to_dict()[key]) == golden(series, "snapshot.json")[key]


def test_the_same_pools_with_the_same_free_lists(series):
    live = golden(series, "snapshot.json")["pools"]
    ours = as_json(decoded(series).to_dict()["pools"])
    assert sorted(ours) == sorted(live)
    for name in live:
        for key in live[name]:
            assert ours[name][key] == live[name][key], (name, key)


def test_the_same_host_stage2(series):
    live = golden(series, "snapshot.json")["host_s2"]
    ours = as_json(decoded(series).to_dict()["host_s2"])
    for key in ("root", "bytes_by_kind", "leaves_by_size", "ranges", "errors"):
        assert ours[key] == live[key], key
    assert ours == live


def test_the_whole_to_dict_is_identical(series):
    assert as_json(decoded(series).to_dict()) == golden(series, "snapshot.json")


@pytest.mark.parametrize("key", ["pools", "vmemmap_sample", "host_s2_leaves", "hyp_s1_leaves", "vmemmap_va",
                                 "hyp_page_shape"])
def test_what_to_dict_leaves_out_is_the_same_too(series, key):
    """Every pool page's (refcount, order) (sums and a hash), the vmemmap sample, every leaf."""
    assert as_json(snapshot_facts(decoded(series))[key]) == golden(series, "facts.json")[key]


def test_the_recorded_state_is_not_trivial(series):
    snap = decoded(series)
    assert snap.unavailable == {} and {"hpool", "host_s2_pool"} <= set(snap.pools)
    assert all(p.free_lists and p.list_errors == [] for p in snap.pools.values() if p.free_pages)
    assert snap.host_s2.leaves and snap.hyp_s1.leaves and snap.memblocks and snap.carveout
    if KernelVersion.parse(snap.kernel_version).has_vm_table:
        assert snap.vms and all(vm.pool.name in snap.pools for vm in snap.vms)
    else:
        assert "vm_table" in snap.absent and snap.vms == []


# --- damage is reported -----------------------------------------------------------------------------

def _a_free_block(snap: Snapshot, pool_name: str) -> tuple[int, int]:
    """(order, PA) of the first block of a non-empty free list of the pool."""
    for order, blocks in sorted(snap.pools[pool_name].free_lists.items()):
        if blocks:
            return order, blocks[0]
    pytest.skip(f"{pool_name} has no free block")


def test_a_prev_that_does_not_point_back_is_a_list_error(series):
    img = image(series)
    order, block = _a_free_block(decoded(series), "host_s2_pool")
    prev = struct.unpack("<Q", img.read(block + 8, 8))[0]
    bad = img.patched(block + 8, struct.pack("<Q", (prev + PAGE_SIZE) & MASK64)).decode()
    assert bad.pools["host_s2_pool"].list_errors == [f"free_area[{order}]: {block:#x}.prev does not point back"]
    assert bad.pools["hpool"].list_errors == []


def test_a_free_list_that_never_returns_to_its_head_is_a_list_error(series):
    img = image(series)
    order, block = _a_free_block(decoded(series), "hpool")
    itself = (block - decoded(series).hyp_physvirt_offset) & MASK64     # the block's own hyp VA
    bad = img.patched(block, struct.pack("<Q", itself)).decode()          # its next: itself
    errors = bad.pools["hpool"].list_errors
    assert f"free_area[{order}] does not return to its head (cycle?)" in errors


def test_an_uninitialised_free_list_is_a_list_error(series):
    img, snap = image(series), decoded(series)
    pool = snap.pools["hpool"]
    fa = img.kernel.struct("hyp_pool").field("free_area")
    bad = img.patched(pool.struct_pa + fa.offset, bytes(8)).decode()
    assert bad.pools["hpool"].list_errors == ["free_area[0] was never initialised (next is NULL)"]
    assert 0 not in bad.pools["hpool"].free_lists


def test_a_missing_page_is_an_error_not_a_value(series):
    img = image(series)
    hpool_pa = decode.kpa(img.kernel, img.kimage_voffset, decode.NVHE + "hpool")
    with pytest.raises(MissingPage, match=f"page {hpool_pa & -PAGE_SIZE:#x} is not in the memory image"):
        img.without(hpool_pa).read(hpool_pa, 8)
    bad = img.without(hpool_pa).decode()
    assert "hpool" not in bad.pools
    assert "MissingPage" in bad.unavailable["pool hpool"]


def test_a_missing_free_block_page_loses_the_pool_not_a_list_entry(series):
    img = image(series)
    _, block = _a_free_block(decoded(series), "host_s2_pool")
    bad = img.without(block).decode()
    assert "host_s2_pool" not in bad.pools
    assert f"page {block:#x} is not in the memory image" in bad.unavailable["pool host_s2_pool"]


def test_a_missing_page_table_page_is_reported(series):
    img, snap = image(series), decoded(series)
    bad = img.without(snap.host_s2_root[0]).decode()
    assert bad.host_s2 is None and "MissingPage" in bad.unavailable["host_s2"]


def test_a_damaged_file_is_refused(series):
    blob = image(series).to_bytes()
    with pytest.raises(BadImage):
        MemoryImage.from_bytes(blob[: len(blob) // 2])
    with pytest.raises(BadImage):
        MemoryImage.from_bytes(b"not an image")


# --- the image machinery on its own ----------------------------------------------------------------

def test_an_image_round_trips_and_zero_pages_cost_nothing(series):
    img = image(series)
    again = MemoryImage.from_bytes(img.to_bytes())
    assert again.pages == img.pages and again.kimage_voffset == img.kimage_voffset and again.meta == img.meta
    zeros = {p: bytes(PAGE_SIZE) for p in range(1 << 32, (1 << 32) + 512 * PAGE_SIZE, PAGE_SIZE)}
    bigger = MemoryImage(img.kernel, img.kimage_voffset, {**img.pages, **zeros}, img.meta)
    # measured before compression: xz's own output moves by a kilobyte or so for a few bytes of header
    assert len(lzma.decompress(bigger.to_bytes())) - len(lzma.decompress(img.to_bytes())) < 200


def test_recording_keeps_whole_pages_and_serves_repeats_from_the_copy():
    memory = bytes(range(256)) * (3 * PAGE_SIZE // 256)
    reads = []

    def source(pa: int, size: int) -> bytes:
        reads.append((pa, size))
        return memory[pa:pa + size]

    rec = RecordingReader(source)
    assert rec.read(PAGE_SIZE - 4, 8) == memory[PAGE_SIZE - 4:PAGE_SIZE + 4]    # across a page boundary
    assert rec.read(PAGE_SIZE + 16, 4) == memory[PAGE_SIZE + 16:PAGE_SIZE + 20]
    assert reads == [(0, PAGE_SIZE), (PAGE_SIZE, PAGE_SIZE)]
    assert sorted(rec.pages) == [0, PAGE_SIZE]


# --- a hand-made pool, so the free-list checks are pinned without a golden image -------------------

OFF = 0x1000_0000                  # hyp_physvirt_offset: PA = hyp VA + OFF
POOL_PA = 0x4000_0000


def _hand_made_kernel(version: str = "6.12.117"):
    from harness.el2.symbols import Field, KernelInfo, Struct
    fields = {"lock.owner": Field(0, 2, "u16"), "lock.next": Field(2, 2, "u16"),
              "free_area": Field(8, 11 * 16, "struct list_head[11]", count=11),
              "range_start": Field(184, 8, "phys_addr_t"), "range_end": Field(192, 8, "phys_addr_t"),
              "max_order": Field(200, 1, "u8")}
    return KernelInfo("hand-made", version, {}, {"hyp_pool": Struct("hyp_pool", 208, fields)})


def _hand_made_pool(free: dict[int, list[int]]) -> dict[int, bytes]:
    mem: dict[int, bytearray] = {}

    def put(pa: int, value: int) -> None:
        page = mem.setdefault(pa & -PAGE_SIZE, bytearray(PAGE_SIZE))
        page[pa % PAGE_SIZE: pa % PAGE_SIZE + 8] = struct.pack("<Q", value & MASK64)

    put(POOL_PA + 184, 0x4100_0000)
    put(POOL_PA + 192, 0x4110_0000)
    put(POOL_PA + 200, 10)
    for k in range(11):
        head = POOL_PA + 8 + 16 * k
        chain = [head, *free.get(k, []), head]
        for a, b in zip(chain, chain[1:]):
            put(a, b - OFF)                 # a.next
            put(b + 8, a - OFF)             # b.prev
    return {p: bytes(d) for p, d in mem.items()}


def test_a_hand_made_pool_decodes_and_its_lists_are_checked():
    kernel = _hand_made_kernel()
    img = MemoryImage(kernel, 0, _hand_made_pool({0: [0x4100_0000, 0x4100_3000], 2: [0x4100_4000]}))
    pool = decode.decode_pool(img.read, kernel, OFF, "p", POOL_PA)
    assert (pool.range_start, pool.range_end, pool.max_order, pool.lock_held) == (0x4100_0000, 0x4110_0000, 10, False)
    assert pool.free_lists[0] == [0x4100_0000, 0x4100_3000] and pool.free_lists[2] == [0x4100_4000]
    assert sorted(pool.free_lists) == list(range(11)) and pool.free_pages == 6 and pool.list_errors == []
    broken = img.patched(0x4100_3000 + 8, struct.pack("<Q", 0x4100_4000 - OFF))
    assert decode.decode_pool(broken.read, kernel, OFF, "p", POOL_PA).list_errors == [
        "free_area[0]: 0x41003000.prev does not point back"]


def test_before_free_lists_include_max_order_the_last_list_is_not_walked():
    kernel = _hand_made_kernel("6.1.150")
    img = MemoryImage(kernel, 0, _hand_made_pool({}))
    img = img.patched(POOL_PA + 8 + 16 * 10, bytes(16))                   # free_area[10] never initialised
    pool = decode.decode_pool(img.read, kernel, OFF, "p", POOL_PA)
    assert sorted(pool.free_lists) == list(range(10)) and pool.list_errors == []
    assert decode.decode_pool(img.read, _hand_made_kernel(), OFF, "p", POOL_PA).list_errors == [
        "free_area[10] was never initialised (next is NULL)"]


def test_page_states_and_guest_stage2_decode_as_the_live_reader_saw(series):
    """6.14+: the vmemmap's page-state bitfields and each VM's stage-2 at EL2; absent before."""
    live, snap = golden(series, "snapshot.json"), decoded(series)
    if not KernelVersion.parse(snap.kernel_version).host_page_state_in_vmemmap:
        assert "page_states" in snap.absent and snap.page_states is None
        return
    assert snap.to_dict()["page_states"] == live["page_states"]
    assert live["page_states"]["host NOPAGE / hyp OWNED"] > 1000        # the carveout, at least
    assert [vm.get("s2_leaves") for vm in live["vms"]] == [len(vm.s2.leaves) for vm in snap.vms if vm.s2]
