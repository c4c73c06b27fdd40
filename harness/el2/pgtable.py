"""Decoding arm64 stage-2 (host) and EL2 stage-1 (hyp) page tables, 4 KiB granule.

Descriptor bits are the architecture's and KVM's constants (arch/arm64/include/asm/kvm_pgtable.h
in 6.12: KVM_PTE_VALID BIT(0), KVM_PTE_TYPE BIT(1), KVM_PTE_ADDR_MASK(_LPA2), S2 MemAttr 5:2,
S2AP 7:6, SH 9:8, AF 10, XN 54, SW 58:55; pKVM page states in SW0/SW1 (nvhe/mem_protect.h);
KVM_INVALID_PTE_OWNER_MASK GENMASK(9, 2); from 7.2 a typed invalid PTE instead, see Leaf.owner).
Pure: tables are read through a callable.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from harness.model.invariants import OWNER_GUEST

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PTES_PER_TABLE = 512

STATES = {0: "OWNED", 1: "SHARED_OWNED", 2: "SHARED_BORROWED", 3: "RESERVED"}   # SW1:SW0
OWNERS = {0: "host", 1: "hyp", 2: "ffa"}                                         # enum pkvm_component_id
OWNERS_TYPED = {0: "host", 1: "hyp", 2: "guest"}                                 # its 7.x values
INVALID_TYPES = {1: "LOCKED", 2: "DONATION", 3: "POISONED"}                      # enum kvm_invalid_pte_type


def level_shift(level: int) -> int:
    return PAGE_SHIFT + 9 * (3 - level)


def pte_to_phys(pte: int, lpa2: bool) -> int:
    if lpa2:
        return (pte & 0x0003_FFFF_FFFF_F000) | (((pte >> 8) & 3) << 50)
    return pte & 0x0000_FFFF_FFFF_F000


@dataclass(frozen=True)
class Leaf:
    addr: int            # input address: IPA (stage-2) or hyp VA (stage-1)
    size: int
    level: int
    pte: int
    lpa2: bool
    typed: bool = False  # invalid PTEs carry a type (KernelVersion.typed_invalid_ptes)

    @property
    def valid(self) -> bool:
        return bool(self.pte & 1)

    @property
    def pa(self) -> int | None:
        return pte_to_phys(self.pte, self.lpa2) if self.valid else None

    @property
    def state(self) -> str | None:
        """pKVM page state from the software bits of a valid leaf."""
        return STATES[(self.pte >> 55) & 3] if self.valid else None

    @property
    def invalid_type(self) -> str | None:
        """LOCKED, DONATION or POISONED for a typed invalid leaf; None otherwise."""
        if self.valid or not self.typed:
            return None
        kind = self.pte >> 60
        return INVALID_TYPES.get(kind, f"type-{kind}")

    @property
    def owner(self) -> int | None:
        """Owner id annotated in an invalid, non-zero leaf (1 = hyp): bits 9:2, or a typed
        donation's bits 3:1."""
        if self.valid or self.pte == 0:
            return None
        if self.typed:
            return (self.pte >> 1) & 0x7 if self.invalid_type == "DONATION" else None
        return (self.pte >> 2) & 0xFF

    # stage-2 attributes
    @property
    def donated_to(self) -> tuple[int, int] | None:
        """(VM handle, guest frame number) of a typed DONATION to a guest: the annotation's
        bits 59:4 hold handle (15:0) and gfn (55:16), host_stage2_encode_gfn_meta in 7.x."""
        if self.invalid_type != "DONATION" or self.owner != OWNER_GUEST:
            return None
        meta = (self.pte >> 4) & ((1 << 56) - 1)
        return meta & 0xFFFF, meta >> 16

    @property
    def memattr(self) -> int:
        return (self.pte >> 2) & 0xF

    @property
    def readable(self) -> bool:
        return bool(self.pte & (1 << 6))

    @property
    def writable(self) -> bool:
        return bool(self.pte & (1 << 7))

    @property
    def xn(self) -> bool:
        return bool(self.pte & (1 << 54))

    @property
    def af(self) -> bool:
        return bool(self.pte & (1 << 10))

    def describe(self) -> str:
        if not self.valid:
            names = OWNERS_TYPED if self.typed else OWNERS
            owner = names.get(self.owner, self.owner) if self.owner is not None else None
            return f"invalid {self.invalid_type} owner={owner}" if self.typed else f"invalid owner={owner}"
        perms = ("R" if self.readable else "-") + ("W" if self.writable else "-") + ("-" if self.xn else "X")
        return f"{perms} memattr={self.memattr:#x} {self.state}"


@dataclass
class Walk:
    leaves: list[Leaf]            # in address order; zero entries are not listed
    tables: list[tuple[int, int]]  # (table page PA, level), the root's pages included
    errors: list[str]
    spans: list[tuple[int, int, int]] = field(default_factory=list)   # (first address, end, level) per table

    _starts: list[int] = field(default_factory=list, repr=False, compare=False)

    def stop_level(self, addr: int) -> int:
        """The level of the entry a walk for `addr` ends on: that of the deepest table covering it."""
        return max((level for start, end, level in self.spans if start <= addr < end), default=0)

    def leaf_at(self, addr: int) -> Leaf | None:
        """The leaf covering addr (zero entries are not leaves: None for an untouched address)."""
        if len(self._starts) != len(self.leaves):       # built on first use, after the walk
            self._starts = [leaf.addr for leaf in self.leaves]
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and self.leaves[i].addr <= addr < self.leaves[i].addr + self.leaves[i].size:
            return self.leaves[i]
        return None


ReadFn = Callable[[int, int], bytes]


def walk(read: ReadFn, root_pa: int, ia_bits: int, start_level: int, lpa2: bool, typed: bool = False) -> Walk:
    """Every non-zero leaf of a table tree. The root may span several concatenated pages.
    `typed`: the stage-2's invalid PTEs carry a type (KernelVersion.typed_invalid_ptes)."""
    result = Walk([], [], [])
    root_entries = 1 << (ia_bits - level_shift(start_level))
    _walk_table(read, root_pa, start_level, 0, max(root_entries, 1), lpa2, typed, result, depth=0)
    return result


def _walk_table(read: ReadFn, table_pa: int, level: int, base: int, entries: int, lpa2: bool, typed: bool,
                out: Walk, depth: int) -> None:
    if depth > 4 or level > 3:
        out.errors.append(f"table at {table_pa:#x}: deeper than level 3")
        return
    for page in range(0, max(entries * 8, PAGE_SIZE) // PAGE_SIZE):
        out.tables.append((table_pa + page * PAGE_SIZE, level))
    out.spans.append((base, base + entries * (1 << level_shift(level)), level))
    raw = read(table_pa, entries * 8)
    ptes = struct.unpack(f"<{entries}Q", raw)
    size = 1 << level_shift(level)
    for i, pte in enumerate(ptes):
        if pte == 0:
            continue
        addr = base + i * size
        if level < 3 and (pte & 3) == 3:          # valid table descriptor
            _walk_table(read, pte_to_phys(pte, lpa2), level + 1, addr, PTES_PER_TABLE, lpa2, typed, out, depth + 1)
        elif level == 3 and (pte & 3) == 1:
            out.errors.append(f"reserved descriptor {pte:#x} at level 3, address {addr:#x}")
        else:
            out.leaves.append(Leaf(addr, size, level, pte, lpa2, typed))


class Translator:
    """VA -> PA through the valid leaves of a stage-1 walk (for non-linear hyp VAs)."""

    def __init__(self, leaves: list[Leaf]) -> None:
        self.leaves = sorted((leaf for leaf in leaves if leaf.valid), key=lambda leaf: leaf.addr)
        self.starts = [leaf.addr for leaf in self.leaves]

    def pa(self, va: int) -> int | None:
        i = bisect.bisect_right(self.starts, va) - 1
        if i < 0:
            return None
        leaf = self.leaves[i]
        if va >= leaf.addr + leaf.size:
            return None
        return leaf.pa + (va - leaf.addr)  # type: ignore[operator]


@dataclass(frozen=True)
class Range:
    """Consecutive leaves with the same kind, merged for summaries."""
    start: int
    end: int
    kind: str               # e.g. "RWX memattr=0xf OWNED", "invalid owner=hyp"
    sizes: tuple[int, ...]  # leaf sizes inside, for the histogram


def merge_ranges(leaves: list[Leaf]) -> list[Range]:
    out: list[Range] = []
    for leaf in leaves:
        kind = leaf.describe()
        if out and out[-1].end == leaf.addr and out[-1].kind == kind:
            prev = out[-1]
            out[-1] = Range(prev.start, leaf.addr + leaf.size, kind, prev.sizes + (leaf.size,))
        else:
            out.append(Range(leaf.addr, leaf.addr + leaf.size, kind, (leaf.size,)))
    return out
