"""Symbols and struct layouts of the kernel under test, from its vmlinux.

Symbols come from `.symtab` (nVHE symbols keep their `__kvm_nvhe_` prefix; DWARF names do not).
Struct layouts (offsets, sizes, types, array lengths, bitfields) come from the DWARF, through
pyelftools. To stay fast, only the compile units that define pKVM's structs are parsed: each is
found through `.debug_aranges` from the address of a function it contains. Nothing here has a
hard-coded offset. The parsed result is cached per vmlinux build id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from elftools.dwarf.die import DIE
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection, SymbolTableSection

from harness.fsutil import atomic_write_text
from harness.kernel.version import KernelVersion

CACHE_SCHEMA = 4
# Structs the EL2 readers need. host_kvm is the pre-6.0 name of host_mmu.
WANTED = ("hyp_pool", "hyp_page", "host_mmu", "host_kvm", "kvm_pgtable", "kvm_s2_mmu", "kvm_arch",
          "pkvm_hyp_vm", "memblock_region", "list_head", "kvm_pgtable_mm_ops", "pkvm_hyp_vcpu")
# Functions whose compile units define those structs, in the order they are tried.
CU_ANCHORS = ("__kvm_nvhe_host_stage2_idmap_locked", "__kvm_nvhe_handle_host_mem_abort",
              "__kvm_nvhe_hyp_alloc_pages", "__kvm_nvhe___pkvm_init_vm", "__kvm_nvhe___pkvm_init",
              "memblock_add")
MAX_DEPTH = 5   # pkvm_hyp_vm.kvm.arch.mmu.pgd_phys
# The host hypercalls' ids: enum __kvm_host_smccc_func, in the compile unit of the host's trap handler.
HYPERCALL_ENUM, HYPERCALL_PREFIX = "__kvm_host_smccc_func", "__KVM_HOST_SMCCC_FUNC_"
HYPERCALL_CU = "__kvm_nvhe_handle_trap"


class Unavailable(LookupError):
    """A symbol or layout this kernel does not have (or has in another shape)."""


class NotInThisKernel(Unavailable):
    """A part this kernel version does not have by design (e.g. vm_table before 6.2), as opposed
    to one that could not be read."""


@dataclass(frozen=True)
class Field:
    offset: int                 # bytes from the start of the outermost struct
    size: int
    type: str                   # C type as written, e.g. "unsigned short", "struct list_head[11]"
    count: int | None = None    # array length, for arrays
    bit_size: int | None = None
    bit_offset: int | None = None   # from the least significant bit of the containing storage


@dataclass
class Struct:
    name: str
    size: int
    fields: dict[str, Field]    # dotted paths: "arch.mmu.pgd_phys"

    def field(self, path: str) -> Field:
        try:
            return self.fields[path]
        except KeyError:
            raise Unavailable(f"struct {self.name} has no field {path}") from None

    def offset(self, path: str) -> int:
        return self.field(path).offset

    def has(self, path: str) -> bool:
        return path in self.fields


@dataclass
class KernelInfo:
    build_id: str
    version: str
    symbols: dict[str, int]
    structs: dict[str, Struct]
    missing: dict[str, str] = field(default_factory=dict)   # struct -> why it is not there
    sizes: dict[str, int] = field(default_factory=dict)     # nVHE function symbol -> its size in bytes
    hypercalls: dict[int, str] = field(default_factory=dict)  # host hypercall id -> "__pkvm_init_vm"

    def sym(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise Unavailable(f"symbol {name} is not in this vmlinux") from None

    def struct(self, name: str) -> Struct:
        if name in self.structs:
            return self.structs[name]
        raise Unavailable(f"struct {name}: {self.missing.get(name, 'not found in the DWARF')}")

    def has_struct(self, name: str) -> bool:
        return name in self.structs

    @property
    def kernel_version(self) -> KernelVersion:
        """`version` (the banner's release string) as a KernelVersion: ask it the version facts.
        ValueError when the vmlinux has no readable banner (`version` "unknown")."""
        return KernelVersion.parse(self.version)


def load(vmlinux: Path, cache_dir: Path | None = None) -> KernelInfo:
    """KernelInfo for a vmlinux; cached under cache_dir/el2-layouts/<build id>.json."""
    with open(vmlinux, "rb") as f:
        elf = ELFFile(f)
        build_id = _build_id(elf)
        cached = cache_dir / "el2-layouts" / f"{build_id}.json" if cache_dir else None
        if cached and cached.is_file():
            data = json.loads(cached.read_text())
            if data.get("schema") == CACHE_SCHEMA:
                return from_json(data)
        info = _parse(elf, build_id)
    if cached:
        atomic_write_text(cached, json.dumps({"schema": CACHE_SCHEMA, **to_json(info)}))
    return info


def to_json(info: KernelInfo) -> dict:
    return {"build_id": info.build_id, "version": info.version, "symbols": info.symbols, "missing": info.missing,
            "sizes": info.sizes, "hypercalls": info.hypercalls,
            "structs": {n: {"size": s.size, "fields": {p: asdict(f) for p, f in s.fields.items()}}
                        for n, s in info.structs.items()}}


def from_json(d: dict) -> KernelInfo:
    structs = {n: Struct(n, s["size"], {p: Field(**f) for p, f in s["fields"].items()})
               for n, s in d["structs"].items()}
    return KernelInfo(d["build_id"], d["version"], d["symbols"], structs, d["missing"], d.get("sizes", {}),
                      {int(k): v for k, v in d.get("hypercalls", {}).items()})


def _build_id(elf: ELFFile) -> str:
    for section in elf.iter_sections():
        if isinstance(section, NoteSection):
            for note in section.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    return note["n_desc"]
    raise Unavailable("vmlinux has no GNU build id note")


def _parse(elf: ELFFile, build_id: str) -> KernelInfo:
    symbols: dict[str, int] = {}
    sizes: dict[str, int] = {}
    symtab = elf.get_section_by_name(".symtab")
    if not isinstance(symtab, SymbolTableSection):
        raise Unavailable("vmlinux has no .symtab: build it without stripping")
    for sym in symtab.iter_symbols():
        if sym.name and sym["st_shndx"] != "SHN_UNDEF":
            symbols.setdefault(sym.name, sym["st_value"])
            if sym.name.startswith("__kvm_nvhe_") and sym["st_info"]["type"] == "STT_FUNC":
                sizes.setdefault(sym.name, sym["st_size"])
    version = _read_banner_version(elf, symbols)
    structs: dict[str, Struct] = {}
    missing: dict[str, str] = {}
    if not elf.has_dwarf_info():
        return KernelInfo(build_id, version, symbols, {}, {n: "vmlinux has no DWARF (CONFIG_DEBUG_INFO)"
                                                          for n in WANTED}, sizes)
    dwarf = elf.get_dwarf_info()
    aranges = dwarf.get_aranges()
    seen: set[int] = set()
    for anchor in CU_ANCHORS:
        if anchor not in symbols or aranges is None:
            continue
        offset = aranges.cu_offset_at_addr(symbols[anchor])
        if offset is None or offset in seen:
            continue
        seen.add(offset)
        for die in dwarf.get_CU_at(offset).iter_DIEs():
            if die.tag == "DW_TAG_structure_type" and "DW_AT_declaration" not in die.attributes:
                name = _name(die)
                if name in WANTED and name not in structs:
                    structs[name] = Struct(name, die.attributes["DW_AT_byte_size"].value, _flatten(die))
        if all(n in structs for n in WANTED if n not in ("host_kvm", "pkvm_hyp_vcpu")):
            break
    for name in WANTED:
        if name not in structs:
            anchors = ", ".join(a for a in CU_ANCHORS if a in symbols)
            missing[name] = f"not defined in the compile units of {anchors}"
    hypercalls = {}
    offset = aranges.cu_offset_at_addr(symbols[HYPERCALL_CU]) if HYPERCALL_CU in symbols and aranges else None
    if offset is not None:
        hypercalls = _hypercalls(dwarf.get_CU_at(offset).iter_DIEs())
    return KernelInfo(build_id, version, symbols, structs, missing, sizes, hypercalls)


def _hypercalls(dies: Iterable[DIE]) -> dict[int, str]:
    """id -> name of each host hypercall (the markers 7.x puts between ranges are left out)."""
    for die in dies:
        if die.tag == "DW_TAG_enumeration_type" and _name(die) == HYPERCALL_ENUM:
            names = ((c.attributes["DW_AT_const_value"].value, _name(c) or "") for c in die.iter_children())
            return {value: name[len(HYPERCALL_PREFIX):] for value, name in names
                    if name.startswith(HYPERCALL_PREFIX + "__")}
    return {}


def _read_banner_version(elf: ELFFile, symbols: dict[str, int]) -> str:
    """The kernel version from linux_banner ("Linux version 6.12.117 ...") in the image itself."""
    addr = symbols.get("linux_banner")
    if addr is None:
        return "unknown"
    for section in elf.iter_sections():
        start, size = section["sh_addr"], section["sh_size"]
        if section["sh_type"] == "SHT_PROGBITS" and start <= addr < start + size:
            data = section.data()[addr - start: addr - start + 200]
            m = re.match(rb"Linux version (\S+)", data)
            return m.group(1).decode() if m else "unknown"
    return "unknown"


# --- DWARF walking -----------------------------------------------------------------------------

def _name(die: DIE) -> str | None:
    attr = die.attributes.get("DW_AT_name")
    return attr.value.decode() if attr else None


def _strip(die: DIE | None) -> DIE | None:
    """Through typedefs and qualifiers to the underlying type."""
    while die is not None and die.tag in ("DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type",
                                          "DW_TAG_restrict_type", "DW_TAG_atomic_type"):
        die = die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None
    return die


def _type_of(die: DIE) -> DIE | None:
    return die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None


def _type_name(die: DIE | None) -> str:
    if die is None:
        return "void"
    tag = str(die.tag)
    if tag == "DW_TAG_pointer_type":
        return _type_name(_type_of(die)) + " *"
    if tag == "DW_TAG_array_type":
        return _type_name(_type_of(die)) + "".join(f"[{n}]" for n in _array_dims(die))
    prefix = {"DW_TAG_structure_type": "struct ", "DW_TAG_union_type": "union ",
              "DW_TAG_enumeration_type": "enum "}.get(tag, "")
    if tag in ("DW_TAG_const_type", "DW_TAG_volatile_type"):
        return _type_name(_type_of(die))
    return prefix + (_name(die) or "<anonymous>")


def _array_dims(die: DIE) -> list[int]:
    dims = []
    for sub in die.iter_children():
        if sub.tag == "DW_TAG_subrange_type":
            if "DW_AT_count" in sub.attributes:
                dims.append(sub.attributes["DW_AT_count"].value)
            elif "DW_AT_upper_bound" in sub.attributes:
                dims.append(sub.attributes["DW_AT_upper_bound"].value + 1)
            else:
                dims.append(0)   # flexible array member
    return dims


def _byte_size(die: DIE | None) -> int:
    die = _strip(die)
    if die is None:
        return 0
    if "DW_AT_byte_size" in die.attributes:
        return die.attributes["DW_AT_byte_size"].value
    if die.tag == "DW_TAG_array_type":
        n = 1
        for d in _array_dims(die):
            n *= d
        return n * _byte_size(_type_of(die))
    if die.tag == "DW_TAG_pointer_type":
        return 8
    return 0


def _flatten(struct: DIE, base: int = 0, prefix: str = "", depth: int = 0) -> dict[str, Field]:
    """Every member as a dotted path; anonymous unions/structs are merged into their parent."""
    fields: dict[str, Field] = {}
    for member in struct.iter_children():
        if member.tag != "DW_TAG_member":
            continue
        loc = member.attributes.get("DW_AT_data_member_location")
        offset = base + (loc.value if loc is not None and isinstance(loc.value, int) else 0)
        mtype = _type_of(member)
        under = _strip(mtype)
        name = _name(member)
        if name is None and under is not None and under.tag in ("DW_TAG_structure_type", "DW_TAG_union_type"):
            fields.update(_flatten(under, offset, prefix, depth))        # anonymous: same level
            continue
        if name is None:
            continue
        path = prefix + name
        count = None
        if under is not None and under.tag == "DW_TAG_array_type":
            dims = _array_dims(under)
            count = dims[0] if dims else None
        bit_size = member.attributes["DW_AT_bit_size"].value if "DW_AT_bit_size" in member.attributes else None
        bit_offset = None
        if "DW_AT_data_bit_offset" in member.attributes:                 # DWARF 4+ style
            bits = member.attributes["DW_AT_data_bit_offset"].value
            offset, bit_offset = base + bits // 8, bits % 8
        elif bit_size is not None and "DW_AT_bit_offset" in member.attributes:   # DWARF 2/3: numbered from the MSB
            storage = member.attributes.get("DW_AT_byte_size")
            storage_bits = 8 * (storage.value if storage else _byte_size(mtype))
            bit_offset = storage_bits - member.attributes["DW_AT_bit_offset"].value - bit_size
        fields[path] = Field(offset, _byte_size(mtype), _type_name(mtype), count, bit_size, bit_offset)
        if under is not None and under.tag in ("DW_TAG_structure_type", "DW_TAG_union_type") \
                and depth + 1 < MAX_DEPTH:
            fields.update(_flatten(under, offset, path + ".", depth + 1))
    return fields
