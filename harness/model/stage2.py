"""Reference model of the pKVM host stage-2 (pure: no I/O).

1. What the host-abort path installs for a faulting address (`predict_fault`): the range, the
   level of its leaves, the attributes, and how many table pages it takes from host_s2_pool.
   6.12 (arch/arm64/kvm/hyp/nvhe/mem_protect.c:348-547):
     find_mem_range()          -> the memblock around addr (memory, RWX) or the gap (MMIO, RW, XN)
     host_stage2_adjust_range() -> the granule, from the level where the table walk stopped
     kvm_pgtable_stage2_map()   -> blocks where the level can hold them, tables down to there
   The 6.12 loop has a quirk: it tests block capability on the already incremented level, so a
   level-0 granule (512 GiB) may be chosen, and the page at level 3 is taken even when it is not
   inside the range. 6.16 (e728e705802f) fixed the first; 7.0 (8531d5a83d8e) falls back to a
   level-3 page. The seed patch kvm_pgtable_stage2_idmap_greedy is the ancestor: a mapping never
   overrides an existing incompatible entry and stays inside the range.
2. Page-state transitions between host and hyp (share, unshare, donate), legal and illegal.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from enum import Enum
from typing import Any

from harness.kernel.version import MODEL_REFERENCE, KernelVersion, VersionLike

PAGE_SHIFT = 12
LAST_LEVEL = 3
MIN_BLOCK_LEVEL = 1           # 4 KiB granule: blocks at levels 1 (1 GiB) and 2 (2 MiB)
ADDR_LIMIT = 1 << 64
MASK64 = ADDR_LIMIT - 1
MEMATTR_NORMAL = 0xF          # the host forces NOFWB: MT_S2_NORMAL for memory and MMIO alike
MEMATTR_FWB_AS_S1 = 0x7       # MT_S2_FWB_AS_S1: 7.2+ host stage-2 on a CPU with FEAT_S2FWB


def host_s2_memattr(version: VersionLike, fwb: bool) -> int:
    """The MemAttr of every host stage-2 leaf: MT_S2_NORMAL, or, where the host stage-2 leaves
    the memory type to stage 1 (KernelVersion.host_s2_memattr_as_s1), MT_S2_FWB_AS_S1 on a CPU
    with FEAT_S2FWB (QEMU's max) and MT_S2_NORMAL without."""
    return MEMATTR_FWB_AS_S1 if fwb and KernelVersion.of(version).host_s2_memattr_as_s1 else MEMATTR_NORMAL


def granule(level: int) -> int:
    return 1 << (PAGE_SHIFT + 9 * (LAST_LEVEL - level))


@dataclass(frozen=True)
class Region:
    base: int
    size: int

    @property
    def end(self) -> int:
        return self.base + self.size


@dataclass(frozen=True)
class MemRange:
    start: int
    end: int
    is_memory: bool


def find_mem_range(addr: int, regions: list[Region]) -> MemRange:
    """find_mem_range(): the memblock holding addr, else the gap between memblocks around it."""
    regions = sorted(regions, key=lambda r: r.base)
    bases = [r.base for r in regions]
    i = bisect.bisect_right(bases, addr) - 1
    if i >= 0 and addr < regions[i].end:
        return MemRange(regions[i].base, regions[i].end, True)
    start = regions[i].end if i >= 0 else 0
    end = regions[i + 1].base if i + 1 < len(regions) else ADDR_LIMIT
    return MemRange(start, end, False)


class HostAbortError(Exception):
    """The abort path refuses; `errno` is what host_stage2_adjust_range returned."""

    def __init__(self, errno: str, message: str) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True)
class Prediction:
    start: int
    size: int
    granule_level: int     # level of the granule chosen by the adjust-range loop
    leaf_level: int        # level of the leaves installed (>= MIN_BLOCK_LEVEL unless pages)
    leaves: int
    is_memory: bool
    table_pages: int       # taken from host_s2_pool (one per level between the walk stop and the leaves)

    @property
    def prot(self) -> str:
        return "RWX" if self.is_memory else "RW"

    @property
    def xn(self) -> bool:
        return not self.is_memory


def _inside(start: int, size: int, r: MemRange) -> bool:
    return r.start <= start and start + size <= r.end


def adjust_range(addr: int, walk_level: int, r: MemRange, version: VersionLike) -> tuple[int, int, int]:
    """host_stage2_adjust_range(): (start, size, level) of the granule to map around addr."""
    kv = KernelVersion.of(version)
    if not kv.stage2_adjust_range_checks_chosen_level:
        # do { cur = granule(level) around addr; level++; }
        # while (level <= LAST && !(level >= MIN_BLOCK_LEVEL && cur inside range));
        level = walk_level
        while True:
            size = granule(level)
            start = addr & ~(size - 1)
            chosen = level
            level += 1
            if not (level <= LAST_LEVEL and not (level >= MIN_BLOCK_LEVEL and _inside(start, size, r))):
                return start, size, chosen
    for level in range(walk_level, LAST_LEVEL + 1):
        size = granule(level)
        start = addr & ~(size - 1)
        if level < MIN_BLOCK_LEVEL and level != LAST_LEVEL:
            continue                                 # kvm_level_supports_block_mapping()
        if _inside(start, size, r):
            return start, size, level
        if kv.stage2_falls_back_to_page and level == LAST_LEVEL:
            return start, size, level                # the level-3 fallback
    raise HostAbortError("EINVAL", f"no granule around {addr:#x} fits in [{r.start:#x}, {r.end:#x}) "
                                   "(WARN_ON in host_stage2_adjust_range: a hyp panic)")


def predict_fault(addr: int, regions: list[Region], walk_level: int, walk_pte: int = 0,
                  version: VersionLike = MODEL_REFERENCE) -> Prediction:
    """The mapping a host abort at `addr` installs. `walk_level`/`walk_pte`: the entry where the
    host stage-2 walk stops (kvm_pgtable_get_leaf)."""
    addr &= ~((1 << PAGE_SHIFT) - 1)                      # HPFAR gives the page
    if walk_pte & 1:
        raise HostAbortError("EAGAIN", f"{addr:#x} is already mapped (a race with another CPU)")
    if walk_pte:
        raise HostAbortError("EPERM", f"{addr:#x} has an owner annotation {walk_pte:#x}: host_stage2_adjust_range "
                                      "returns -EPERM and handle_host_mem_abort hits BUG_ON(ret && ret != -EAGAIN)")
    r = find_mem_range(addr, regions)
    start, size, level = adjust_range(addr, walk_level, r, version)
    leaf_level = max(level, MIN_BLOCK_LEVEL)              # the map walker only puts blocks at >= 1
    return Prediction(start, size, level, leaf_level, size // granule(leaf_level), r.is_memory,
                      leaf_level - walk_level)


def predict_from_tables(addr: int, regions: list[Region], walk,
                        version: VersionLike = MODEL_REFERENCE) -> Prediction:
    """predict_fault() on a decoded host stage-2 (`walk`: leaves and the span of each table,
    as harness.el2.pgtable.Walk has them): where the walk for addr stops, and what is there."""
    leaf = walk.leaf_at(addr)
    if leaf is not None:
        return predict_fault(addr, regions, leaf.level, leaf.pte, version)
    return predict_fault(addr, regions, walk.stop_level(addr), 0, version)


def untouched_by_leaf_level(walk, regions: list[Region], start: int, end: int,
                            version: VersionLike = MODEL_REFERENCE) -> dict[int, int]:
    """For each leaf level a host access in [start, end) would install now, the first address
    that gets it: addresses with a zero entry (never mapped, no owner), one per 4 KiB page."""
    version = KernelVersion.of(version)
    found: dict[int, int] = {}
    addr = start & ~((1 << PAGE_SHIFT) - 1)
    while addr < end and len(found) < 3:
        leaf = walk.leaf_at(addr)
        if leaf is not None:
            addr = leaf.addr + leaf.size
            continue
        try:
            pred = predict_from_tables(addr, regions, walk, version)
        except HostAbortError:
            addr += 1 << PAGE_SHIFT
            continue
        found.setdefault(pred.leaf_level, addr)
        addr = max(pred.start + pred.size, addr + (1 << PAGE_SHIFT))   # the rest of it maps alike
    return found


# --- page states ----------------------------------------------------------------------------

class State(str, Enum):
    OWNED = "OWNED"
    SHARED_OWNED = "SHARED_OWNED"
    SHARED_BORROWED = "SHARED_BORROWED"
    NOPAGE = "NOPAGE"


# enum pkvm_page_state's values, as struct hyp_page stores the host's state and the complement
# of the hyp's (nvhe/memory.h, 6.14+); a zeroed entry is host OWNED, hyp NOPAGE, no guest shares.
STATE_CODES = {State.OWNED: 0, State.SHARED_OWNED: 1, State.SHARED_BORROWED: 2, State.NOPAGE: 3}
STATE_OF_CODE = {code: state for state, code in STATE_CODES.items()}
DEFAULT_VMEMMAP_STATE = (STATE_CODES[State.OWNED], STATE_CODES[State.NOPAGE], 0)


def in_hyp_linear_map(leaf: Any, hyp_physvirt_offset: int) -> bool:
    """Whether a hyp stage-1 leaf is in the hyp's linear map (hyp VA = PA - hyp_physvirt_offset),
    not its private range (stacks, fixmap, vmemmap, MMIO)."""
    return (leaf.pa - leaf.addr) & MASK64 == hyp_physvirt_offset & MASK64


def state_name(code: int) -> str:
    """The name of a stored state code, or what is wrong with it."""
    return STATE_OF_CODE[code].value if code in STATE_OF_CODE else f"impossible state {code:#x}"


class IllegalTransition(Exception):
    pass


# transition -> ((host before, host after), (hyp before, hyp after)); mem_protect.c:909-1090
TRANSITIONS = {
    "host_share_hyp": ((State.OWNED, State.SHARED_OWNED), (State.NOPAGE, State.SHARED_BORROWED)),
    "host_unshare_hyp": ((State.SHARED_OWNED, State.OWNED), (State.SHARED_BORROWED, State.NOPAGE)),
    "host_donate_hyp": ((State.OWNED, State.NOPAGE), (State.NOPAGE, State.OWNED)),
    "hyp_donate_host": ((State.NOPAGE, State.OWNED), (State.OWNED, State.NOPAGE)),
}


@dataclass
class PageStates:
    """Host and hyp views of pages (a page absent from a map is host OWNED / hyp NOPAGE)."""

    host: dict[int, State]
    hyp: dict[int, State]
    pins: dict[int, int]

    @classmethod
    def empty(cls) -> PageStates:
        return cls({}, {}, {})

    def view(self, pa: int) -> tuple[State, State]:
        return self.host.get(pa, State.OWNED), self.hyp.get(pa, State.NOPAGE)

    def apply(self, transition: str, pa: int, nr_pages: int = 1) -> None:
        """All pages or none, as the kernel's check-then-complete sequence does."""
        (h_from, h_to), (y_from, y_to) = TRANSITIONS[transition]
        pages = [pa + (i << PAGE_SHIFT) for i in range(nr_pages)]
        for p in pages:
            host, hyp = self.view(p)
            if host != h_from:
                raise IllegalTransition(f"{transition} {p:#x}: host state {host.value}, needs {h_from.value} "
                                        "(__host_check_page_state_range: -EPERM)")
            if hyp != y_from:
                raise IllegalTransition(f"{transition} {p:#x}: hyp state {hyp.value}, needs {y_from.value} "
                                        "(__hyp_check_page_state_range: -EPERM)")
            if transition == "host_unshare_hyp" and self.pins.get(p):
                raise IllegalTransition(f"host_unshare_hyp {p:#x}: pinned {self.pins[p]} times (-EBUSY)")
        for p in pages:
            self.host[p], self.hyp[p] = h_to, y_to
