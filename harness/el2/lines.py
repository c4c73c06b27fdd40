"""Source lines and functions of pKVM's nVHE hypervisor code, from the DWARF of its vmlinux.

Only the nVHE compile units are decoded: `.debug_aranges` names the units with code inside the nVHE
text (between the `__kvm_nvhe___hyp_*text_*` symbols), and of those only the ones named under
arch/arm64/kvm/hyp/ are read. The host's own build of arch/arm64/kvm/hyp/pgtable.c and the VHE
objects share those source names but not that text, so they never mix in. Addresses are vmlinux
link-time addresses, as the `__kvm_nvhe_*` symbols have them.

Lines of inlined code keep their own file (a header such as hyp/include/nvhe/memory.h), as gcov
does. Paths are relative to the kernel source tree (generated headers: to the build directory).
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from elftools.dwarf.compileunit import CompileUnit
from elftools.dwarf.die import DIE
from elftools.dwarf.dwarfinfo import DWARFInfo
from elftools.dwarf.lineprogram import LineProgram
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from harness.el2.symbols import Unavailable

HYP_DIR = "arch/arm64/kvm/hyp/"
INSN = 4        # arm64: every instruction is 4 bytes
# [start, end) of the nVHE text: hyp-init.S lives in the idmap text, the rest in the hyp text.
TEXT_BOUNDS = (("__kvm_nvhe___hyp_idmap_text_start", "__kvm_nvhe___hyp_idmap_text_end"),
               ("__kvm_nvhe___hyp_text_start", "__kvm_nvhe___hyp_text_end"))


@dataclass(frozen=True)
class Row:
    """One is_stmt row of the line table: its code is [start, end), up to the next is_stmt row (or
    the end of its sequence). A row with no bytes (the next row has the same address) stands for
    the one instruction at `start`; `addresses` gives the instructions either way."""

    start: int
    end: int
    file: str
    line: int

    @property
    def addresses(self) -> range:
        return range(self.start, max(self.end, self.start + INSN), INSN)


@dataclass(frozen=True)
class Function:
    """An out-of-line function (a DW_TAG_subprogram with code): its code is [low, high)."""

    name: str       # the DWARF name, without the __kvm_nvhe_ prefix the symbols have
    file: str
    line: int       # where it is declared (DW_AT_decl_line)
    low: int
    high: int


@dataclass
class Lines:
    """What was read: rows sorted by address, functions by file and line, and the absolute source
    tree the DWARF names (None when its paths say nothing of it)."""

    rows: list[Row]
    functions: list[Function]
    source_root: Path | None

    def instrumentable(self) -> dict[str, set[int]]:
        """file -> the lines that have at least one row: the lines coverage can say anything of."""
        found: dict[str, set[int]] = defaultdict(set)
        for row in self.rows:
            found[row.file].add(row.line)
        return dict(found)


def load(vmlinux: Path) -> Lines:
    """The nVHE rows and functions of a vmlinux built with CONFIG_DEBUG_INFO (about 2 s on 6.12)."""
    with open(vmlinux, "rb") as f:
        elf = ELFFile(f)
        if not elf.has_dwarf_info():
            raise Unavailable(f"{vmlinux} has no DWARF: build it with CONFIG_DEBUG_INFO")
        windows = _text_windows(elf)
        dwarf = elf.get_dwarf_info()
        rows: list[Row] = []
        functions: list[Function] = []
        root: Path | None = None
        for cu in _hyp_units(dwarf, windows):
            program = dwarf.line_program_for_CU(cu)
            if program is None:
                continue
            unit = _Unit(cu, program)
            if unit.root is None:
                continue
            root = root or unit.root
            unit_rows = [r for r in unit.rows() if _inside(r.start, windows)]
            rows += unit_rows
            functions += [fn for fn in unit.functions(unit_rows) if _inside(fn.low, windows)]
    rows.sort(key=lambda r: (r.start, r.end))
    functions.sort(key=lambda fn: (fn.file, fn.line, fn.low))
    return Lines(rows, functions, root)


def _text_windows(elf: ELFFile) -> list[tuple[int, int]]:
    symtab = elf.get_section_by_name(".symtab")
    if not isinstance(symtab, SymbolTableSection):
        raise Unavailable("vmlinux has no .symtab: build it without stripping")
    wanted = {name for pair in TEXT_BOUNDS for name in pair}
    addr = {s.name: s["st_value"] for s in symtab.iter_symbols() if s.name in wanted}
    windows = [(addr[a], addr[b]) for a, b in TEXT_BOUNDS if a in addr and b in addr]
    if not windows:
        raise Unavailable("vmlinux has no nVHE text (__kvm_nvhe___hyp_text_start): is CONFIG_KVM set?")
    return windows


def _inside(addr: int, windows: list[tuple[int, int]]) -> bool:
    return any(lo <= addr < hi for lo, hi in windows)


def _hyp_units(dwarf: DWARFInfo, windows: list[tuple[int, int]]) -> list[CompileUnit]:
    """Units with code in the nVHE text, named under arch/arm64/kvm/hyp/. Picked through
    .debug_aranges because parsing every unit's first DIE (its abbreviations) takes seconds."""
    aranges = dwarf.get_aranges()
    if aranges is None:
        raise Unavailable("vmlinux has no .debug_aranges")
    offsets = sorted({e.info_offset for e in aranges.entries
                      if any(e.begin_addr < hi and lo < e.begin_addr + e.length for lo, hi in windows)})
    units = []
    for offset in offsets:
        cu = dwarf.get_CU_at(offset)
        comp_dir, name = _unit_paths(cu.get_top_DIE())
        if HYP_DIR in os.path.normpath(os.path.join(comp_dir, name)):
            units.append(cu)
    return units


def _unit_paths(top: DIE) -> tuple[str, str]:
    def text(attr: str) -> str:
        a = top.attributes.get(attr)
        return a.value.decode(errors="replace") if a else ""
    return text("DW_AT_comp_dir"), text("DW_AT_name")


class _Unit:
    """One compile unit: its file table with paths made relative, its rows and its functions."""

    def __init__(self, cu: CompileUnit, program: LineProgram) -> None:
        self.cu = cu
        self.program = program
        self.build_dir, name = _unit_paths(cu.get_top_DIE())
        full = os.path.normpath(os.path.join(self.build_dir, name))
        cut = full.rfind("/" + HYP_DIR)
        # A relative unit name without a build dir (unusual) leaves the root unknown.
        self.root = Path(full[:cut]) if cut > 0 and os.path.isabs(full) else None
        self.files = self._file_table()

    def _file_table(self) -> dict[int, str]:
        header = self.program.header
        v5 = header["version"] >= 5        # DWARF 5 numbers files and directories from 0, with 0 the unit's own
        dirs = [d.decode(errors="replace") for d in header["include_directory"]]
        files: dict[int, str] = {}
        for i, entry in enumerate(header["file_entry"]):
            d = entry["dir_index"]
            directory = (dirs[d] if d < len(dirs) else "") if v5 else (dirs[d - 1] if d else self.build_dir)
            path = os.path.join(self.build_dir, directory, entry["name"].decode(errors="replace"))
            files[i if v5 else i + 1] = self._relative(os.path.normpath(path))
        return files

    def _relative(self, path: str) -> str:
        for base in (str(self.root) if self.root else None, self.build_dir):
            if base and path.startswith(base.rstrip("/") + "/"):
                return os.path.relpath(path, base)
        return path

    def rows(self) -> list[Row]:
        out: list[Row] = []
        sequence: list[tuple[int, int, int]] = []     # (address, file, line) of its is_stmt rows
        for entry in self.program.get_entries():
            state = entry.state
            if state is None:
                continue
            if state.end_sequence:
                ends = [a for a, _, _ in sequence[1:]] + [state.address]
                # Line 0 is code the compiler ties to no line: it still ends the row before it.
                out += [Row(a, end, self.files.get(f, "?"), line)
                        for (a, f, line), end in zip(sequence, ends) if line]
                sequence = []
            elif state.is_stmt:
                sequence.append((state.address, state.file, state.line))
        return out

    def functions(self, rows: list[Row]) -> list[Function]:
        """Functions with code. C has no nested functions, so the unit's children are enough (and
        skipping the rest of the tree through DW_AT_sibling is several times faster)."""
        first_row = {}
        for row in reversed(rows):
            first_row[row.start] = row
        out = []
        for die in self.cu.get_top_DIE().iter_children():
            if die.tag != "DW_TAG_subprogram" or "DW_AT_low_pc" not in die.attributes \
                    or "DW_AT_high_pc" not in die.attributes:
                continue
            low = die.attributes["DW_AT_low_pc"].value
            high_attr = die.attributes["DW_AT_high_pc"]
            high = high_attr.value if high_attr.form == "DW_FORM_addr" else low + high_attr.value
            name, file, line = _declared(die)
            if name is None:
                continue
            if file in self.files and line:
                out.append(Function(name, self.files[file], line, low, high))
            elif low in first_row:      # assembler functions: gas gives them no decl_file/decl_line
                out.append(Function(name, first_row[low].file, first_row[low].line, low, high))
        return out


def _declared(die: DIE) -> tuple[str | None, int, int]:
    """Name, decl_file and decl_line, through the abstract origin (inlined-elsewhere functions,
    .constprop/.isra clones) or the declaration (DW_AT_specification) when the DIE lacks them."""
    name, file, line = None, 0, 0
    seen = 0
    current: DIE | None = die
    while current is not None and seen < 8:
        attrs = current.attributes
        if name is None and "DW_AT_name" in attrs:
            name = attrs["DW_AT_name"].value.decode(errors="replace")
        if not file and "DW_AT_decl_file" in attrs:
            file = attrs["DW_AT_decl_file"].value
        if not line and "DW_AT_decl_line" in attrs:
            line = attrs["DW_AT_decl_line"].value
        ref = next((a for a in ("DW_AT_abstract_origin", "DW_AT_specification") if a in attrs), None)
        current = current.get_DIE_from_attribute(ref) if ref else None
        seen += 1
    return name, file, line
