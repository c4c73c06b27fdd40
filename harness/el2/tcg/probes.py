"""What el2trace watches, from vmlinux: the spec file the plugin reads, and the layout the stream
decoder needs to read its records back (saved beside the stream, so a run directory decodes
offline).

Every address is a vmlinux link address; the plugin learns the hyp VA offset at run time. Returns
are the function's own `ret` instructions (a return through a tail call is not seen: the entry
record stands alone, which the decoder allows).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from elftools.elf.elffile import ELFFile

from harness.el2.decode import NVHE
from harness.el2.symbols import KernelInfo, Unavailable
from harness.fsutil import atomic_write_bytes, atomic_write_text
from harness.kernel.version import KernelVersion
from harness.model.guest_transitions import DONATE, GUEST_FUNCTIONS, GUEST_SHARE, GUEST_UNSHARE, SHARE
from harness.model.transitions import HOST_HYP_FUNCTIONS

# Function ids are the plugin's `fn` field; their order is fixed here and saved with the run.
ALLOCATOR = ("hyp_pool_init", "hyp_alloc_pages", "hyp_put_page", "hyp_get_page", "hyp_split_page")
# handle_host_hcall is inlined into handle_trap on the kernels built here: handle_trap is every
# host exception at EL2; ESR_EL2 tells a hypercall (EC 0x16) from a stage-2 fault.
TRAP = "handle_trap"
FUNCTIONS = (*ALLOCATOR, TRAP)
# Also probed where the kernel has them: the page-state transitions between host and hyp
# (harness.model.transitions.HOST_HYP_FUNCTIONS) and between host and guests (6.14+:
# harness.model.guest_transitions.GUEST_FUNCTIONS). Each runs whole under its components' locks.
# The guest calls that take a pkvm_hyp_vcpu, by the register holding it: its vcpu.kvm (the
# pkvm_hyp_vm) is read at entry, a VM key.
GUEST_VCPU_REGISTER = {SHARE: 3, DONATE: 2, GUEST_SHARE: 0, GUEST_UNSHARE: 0}
# The pages a donation moves (x0 pfn, x1 pages), scanned where the hyp maps them: what the hyp
# gives back at its entry, what it is given at its return. What comes back must hold no hyp data:
# zero, or what the host put there (the same hash). `z`/`y` reads, el2trace.c.
PAGE_SCANS = {"__pkvm_hyp_donate_host": ("e", "z0:1"), "__pkvm_host_donate_hyp": ("r", "y0:1")}
SCAN_HASHED = 16                      # pages hashed per call (el2trace.c SCAN_HASHED)
SCAN_LEN = 16 + 8 * SCAN_HASHED
RET_WORDS = (0xD65F03C0, 0xD65F0BFF, 0xD65F0FFF)       # ret, retaa, retab
HOST_VECTOR = "__kvm_hyp_host_vector"
ANCHOR_WORDS = 4
CTXT_REGS = 8          # host x0..x7 read at handle_trap's entry (struct kvm_cpu_context starts with regs)
RESULT_REGS = 4        # host x0..x3 at its return (SMCCC: x0 status, x1.. results)
GLOBAL_POOLS = ("hpool", "host_s2_pool")


@dataclass(frozen=True)
class Layout:
    """How to read a run's records back: function names by id, each probe's reads, hyp_page."""

    kernel_version: str                   # the vmlinux banner's release ("6.12.117"): the model's rules
    functions: list[str]
    reads: dict[str, list[int]]           # "<fn id><e|r>" -> byte length of each read
    extra_registers: list[str]
    page_size: int                        # sizeof(struct hyp_page)
    page_fields: dict[str, dict] = field(default_factory=dict)   # refcount, order: symbols.Field as a dict
    pools: dict[str, str] = field(default_factory=dict)          # link address (decimal) -> global pool name
    vmlinux: str = ""                     # the kernel the addresses belong to (coverage maps them to lines)
    hypercalls: dict[str, str] = field(default_factory=dict)     # host hypercall id (decimal) -> name

    def hypercall_names(self) -> dict[int, str]:
        return {int(k): v for k, v in self.hypercalls.items()}

    def pool_links(self) -> dict[int, str]:
        return {int(k): v for k, v in self.pools.items()}

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> Layout:
        return Layout(**json.loads(text))


@dataclass(frozen=True)
class Spec:
    text: str              # the plugin's spec file
    layout: Layout
    hyp_text: bytes        # the hypervisor's text as linked (block test and coverage)
    hyp_text_start: int


def _read_link(elf: ELFFile, addr: int, size: int) -> bytes:
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= addr and addr + size <= seg["p_vaddr"] + seg["p_filesz"]:
            seg.stream.seek(seg["p_offset"] + addr - seg["p_vaddr"])
            return seg.stream.read(size)
    raise Unavailable(f"{addr:#x}+{size:#x} is not in a loaded segment of vmlinux")


def _words(raw: bytes) -> list[int]:
    return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw) - 3, 4)]


def make_spec(info: KernelInfo, vmlinux: Path) -> Spec:
    """The spec for this vmlinux. Unavailable when it lacks a symbol or hyp_page's layout."""
    hp = info.struct("hyp_page")
    page_reads = [f"p1:{hp.size}"]
    lines = [f"vars {info.sym(NVHE + '__hyp_vmemmap'):x} {info.sym(NVHE + 'hyp_physvirt_offset'):x} {hp.size:x}",
             "extra ESR_EL2"]
    reads: dict[str, list[int]] = {}
    with open(vmlinux, "rb") as f:
        elf = ELFFile(f)
        start, end = info.sym(NVHE + "__hyp_text_start"), info.sym(NVHE + "__hyp_text_end")
        text = _read_link(elf, start, end - start)
    vector = info.sym(NVHE + HOST_VECTOR)
    for entry in range(0, 0x800, 0x80):            # the host's first EL2 code at a hyp VA
        words = _words(text[vector + entry - start:][:4 * ANCHOR_WORDS])
        lines.append(f"anchor {vector + entry:x} " + " ".join(f"{w:x}" for w in words))
    vcpu_kvm = info.struct("pkvm_hyp_vcpu").offset("vcpu.kvm") if info.has_struct("pkvm_hyp_vcpu") else None
    guest_calls = [n for n in GUEST_FUNCTIONS if NVHE + n in info.symbols and vcpu_kvm is not None
                   and KernelVersion.parse(info.version).guest_transitions_read] if info.version != "unknown" else []
    functions = [*FUNCTIONS, *(n for n in HOST_HYP_FUNCTIONS if NVHE + n in info.symbols), *guest_calls]
    for fn_id, name in enumerate(functions):
        sym = NVHE + name
        addr, size = info.sym(sym), info.sizes.get(sym, 0)
        if not size:
            raise Unavailable(f"{sym} has no size in vmlinux's symbol table")
        body = _words(text[addr - start:addr - start + size])
        lines.append(f"anchor {addr:x} " + " ".join(f"{w:x}" for w in body[:ANCHOR_WORDS]))
        scan = PAGE_SCANS.get(name, ("", ""))
        vcpu_reg = GUEST_VCPU_REGISTER.get(name)
        entry_reads = page_reads if name in ("hyp_put_page", "hyp_get_page") else \
            [f"m0+0:{8 * CTXT_REGS}"] if name == TRAP else [scan[1]] if scan[0] == "e" else \
            [f"m{vcpu_reg}+{vcpu_kvm:x}:8"] if vcpu_reg is not None else []
        ret_reads = [f"e0+0:{8 * RESULT_REGS}"] if name == TRAP else [scan[1]] if scan[0] == "r" else []
        lines.append(f"probe {fn_id} e {addr:x} {','.join(entry_reads) or '-'}")
        reads[f"{fn_id}e"] = [_length(r) for r in entry_reads]
        rets = [addr + 4 * i for i, w in enumerate(body) if w in RET_WORDS]
        if not rets:
            raise Unavailable(f"{sym} has no ret instruction")
        lines += [f"probe {fn_id} r {r:x} {','.join(ret_reads) or '-'}" for r in rets]
        reads[f"{fn_id}r"] = [_length(r) for r in ret_reads]
    fields = {n: asdict(hp.field(n)) for n in ("refcount", "order")}
    pools = {str(info.sym(NVHE + n)): n for n in GLOBAL_POOLS}
    layout = Layout(info.version, functions, reads, ["ESR_EL2"], hp.size, fields, pools, str(vmlinux.resolve()),
                    {str(k): v for k, v in info.hypercalls.items()})
    return Spec("\n".join(lines) + "\n", layout, text, start)


def _length(read: str) -> int:
    return SCAN_LEN if read[0] in "zy" else int(read.rsplit(":", 1)[1])


def write(spec: Spec, run_dir: Path) -> tuple[Path, Path]:
    """The spec, the hyp text and the layout in run_dir; returns (spec file, stream file)."""
    text_file = run_dir / "el2trace-text.bin"
    spec_file = run_dir / "el2trace.spec"
    atomic_write_bytes(text_file, spec.hyp_text)
    atomic_write_text(spec_file, spec.text + f"text {spec.hyp_text_start:x} {len(spec.hyp_text):x} "
                                             f"{text_file.resolve()}\n")
    atomic_write_text(run_dir / "el2trace-layout.json", spec.layout.to_json() + "\n")
    return spec_file, run_dir / "el2trace.bin"
