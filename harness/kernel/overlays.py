"""Harness-only kernel code, brought in by the config symbol that enables it.

A test kernel may carry code no shipping kernel has:
  - the hostile host (harness/kernel/hostile/, CONFIG_PKVM_HOSTILE_HOST, `--config pkvm-hostile-host`);
  - the EL2 state dump (harness/kernel/el2dump/, CONFIG_PKVM_EL2_DUMP, `--config pkvm-el2-dump`):
    a host hypercall and a debugfs file through which a board's EL2 memory is read.
When the merged config asks for such a symbol, `patches_for` writes a patch for this source tree
that adds the code, its Kconfig entry, its Makefile lines and the few lines it needs in existing
files (each placed by a pattern, so one overlay serves every kernel version that has the anchor);
the build applies it like a --patch, so the kernel is cached apart and the default kernel never
has the code.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UsageError
from harness.fsutil import atomic_write_text
from harness.kernel.config import ConfigOption
from harness.kernel.version import KernelVersion

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Insert:
    """`text` goes into `path` just before the first line matching `before` that follows the first
    line matching `after` (the start of the file when `after` is empty). `when` names a
    KernelVersion fact the edit needs (a kernel without it does not get the edit), `unless` one
    that makes it unneeded (a kernel with it does not get the edit)."""

    path: str
    text: str
    before: str
    after: str = ""
    when: str = ""
    unless: str = ""

    def applies_to(self, version: KernelVersion) -> bool:
        return (not self.when or getattr(version, self.when)) and not (self.unless and getattr(version, self.unless))


@dataclass(frozen=True)
class Overlay:
    symbol: str                            # the Kconfig symbol that enables it (without CONFIG_)
    kconfig_dir: str                       # whose Kconfig gets the entry
    kconfig: str                           # the entry, appended
    files: tuple[tuple[Path, str], ...]    # (harness file, where in the tree)
    edits: tuple[Insert, ...]              # lines added to existing files (Makefiles included)


HOSTILE_HOST = Overlay(
    "PKVM_HOSTILE_HOST", "arch/arm64/kvm",
    "\nconfig PKVM_HOSTILE_HOST\n"
    "\tbool \"pkvm-harness: a hostile host's hypercall interface in debugfs (test kernels only)\"\n"
    "\tdepends on KVM && DEBUG_FS\n"
    "\thelp\n"
    "\t  Lets user space issue host hypercalls with any arguments. Never enable it in a kernel\n"
    "\t  that runs anything but the pkvm-harness's tests.\n",
    files=((HERE / "hostile" / "pkvm_hostile.c", "arch/arm64/kvm/pkvm_hostile.c"),),
    edits=(Insert("arch/arm64/kvm/Makefile", "obj-$(CONFIG_PKVM_HOSTILE_HOST) += pkvm_hostile.o\n", r"\Z"),))

DUMP_HYPERCALL = "__pkvm_el2_dump"

# The allocator's calls, the host's hypercalls and the host/hyp transitions, what el2trace and the
# gdbstub tracer see on QEMU: in the harness's event ring on every kernel (harness/el2/ring.py),
# and where the kernel has the trace remote (7.x: tracefs' remotes/hypervisor/,
# harness/targets/hyp_trace.py) also as hypervisor trace events. el2dump/pkh_events.h has both.
_HYP_EVENTS = (HERE / "el2dump" / "pkvm_hypevents.h").read_text()
_PA = "hyp_virt_to_phys"
_NOT_DUMP = f"if (id != __KVM_HOST_SMCCC_FUNC_{DUMP_HYPERCALL})\n\t\t"
_INCLUDE = "#include <nvhe/pkh_events.h>\n"
EVENTS = (
    Insert("arch/arm64/include/asm/kvm_hypevents.h", _HYP_EVENTS, r"^#endif", r"^HYP_EVENT\(selftest,",
           when="has_hyp_trace_remote"),
    *(Insert(path, text, before, after) for path, text, before, after in (
        ("arch/arm64/kvm/hyp/nvhe/page_alloc.c", _INCLUDE, r"^#include <nvhe/gfp.h>", ""),
        ("arch/arm64/kvm/hyp/nvhe/page_alloc.c", f"\tpkh_ev_put({_PA}(pool), {_PA}(addr), p->refcount, p->order);\n",
         r"^\thyp_spin_lock\(&pool->lock\);", r"^void hyp_put_page\("),
        ("arch/arm64/kvm/hyp/nvhe/page_alloc.c", f"\tpkh_ev_get({_PA}(pool), {_PA}(addr), p->refcount, p->order);\n",
         r"^\thyp_spin_lock\(&pool->lock\);", r"^void hyp_get_page\("),
        ("arch/arm64/kvm/hyp/nvhe/page_alloc.c", "\tpkh_ev_split(hyp_page_to_phys(p));\n",
         r"^\tp->order = 0;", r"^void hyp_split_page\("),
        ("arch/arm64/kvm/hyp/nvhe/page_alloc.c", f"\t\tpkh_ev_alloc({_PA}(pool), order, 0);\n",
         r"^\t\treturn NULL;", r"^void \*hyp_alloc_pages\("),
        ("arch/arm64/kvm/hyp/nvhe/page_alloc.c", f"\tpkh_ev_alloc({_PA}(pool), order, hyp_page_to_phys(p));\n",
         r"^\treturn hyp_page_to_virt\(p\);", r"^void \*hyp_alloc_pages\("),
        ("arch/arm64/kvm/hyp/nvhe/page_alloc.c", f"\tpkh_ev_pool_init({_PA}(pool), pfn, nr_pages, reserved_pages);\n",
         r"^\thyp_spin_lock_init\(&pool->lock\);", r"^int hyp_pool_init\("),
        ("arch/arm64/kvm/hyp/nvhe/hyp-main.c", _INCLUDE, r"^#include <nvhe/trap_handler.h>", ""),
        ("arch/arm64/kvm/hyp/nvhe/hyp-main.c",
         f"\t{_NOT_DUMP}pkh_ev_hcall(id, cpu_reg(host_ctxt, 1), cpu_reg(host_ctxt, 2), cpu_reg(host_ctxt, 3));\n",
         r"^\thfn\(host_ctxt\);", r"^static void handle_host_hcall\("),
        ("arch/arm64/kvm/hyp/nvhe/hyp-main.c", f"\t{_NOT_DUMP}pkh_ev_hcall_ret(id, cpu_reg(host_ctxt, 1));\n",
         r"^\treturn;", r"^\thfn\(host_ctxt\);"),
        ("arch/arm64/kvm/hyp/nvhe/mem_protect.c", _INCLUDE, r"^#include <nvhe/mm.h>", ""),
    )),
    # each host/hyp transition at its end, under both locks (every version releases the hyp's
    # first); 7.x's range check before the locks (-EINVAL, nothing changed) is not recorded
    *(Insert("arch/arm64/kvm/hyp/nvhe/mem_protect.c", f"\tpkh_ev_xfer({kind}, {pa}, {pages}, {ret});\n",
             r"^\thyp_unlock_component\(\);", rf"^(int|void) {fn}\(", when=when)
      for fn, kind, pa, pages, ret, when in (
        ("__pkvm_host_share_hyp", "PKH_SHARE_HYP", "hyp_pfn_to_phys(pfn)", "1", "ret", ""),
        ("__pkvm_host_unshare_hyp", "PKH_UNSHARE_HYP", "hyp_pfn_to_phys(pfn)", "1", "ret", ""),
        ("__pkvm_host_donate_hyp", "PKH_DONATE_HYP", "hyp_pfn_to_phys(pfn)", "nr_pages", "ret",
         "has_host_hyp_donations"),
        ("__pkvm_hyp_donate_host", "PKH_HYP_DONATE_HOST", "hyp_pfn_to_phys(pfn)", "nr_pages", "ret",
         "has_host_hyp_donations"),
        ("hyp_pin_shared_mem", "PKH_PIN", "__hyp_pa(start)", "(end - start) >> PAGE_SHIFT", "ret",
         "has_host_hyp_donations"),
        ("hyp_unpin_shared_mem", "PKH_UNPIN", "__hyp_pa(start)", "(end - start) >> PAGE_SHIFT", "0",
         "has_host_hyp_donations"))),
    # what the pages the hyp gives back hold, before it takes the locks
    Insert("arch/arm64/kvm/hyp/nvhe/mem_protect.c", "\tpkh_ev_giving_back(hyp_pfn_to_phys(pfn), nr_pages);\n",
           r"^\thost_lock_component\(\);", r"^int __pkvm_hyp_donate_host\(", when="has_host_hyp_donations"),
)
EL2_DUMP = Overlay(
    "PKVM_EL2_DUMP", "arch/arm64/kvm",
    "\nconfig PKVM_EL2_DUMP\n"
    "\tbool \"pkvm-harness: read EL2 memory through a hypercall and debugfs (test kernels only)\"\n"
    "\tdepends on KVM && DEBUG_FS && SMP\n"
    "\thelp\n"
    "\t  Adds the host hypercall __pkvm_el2_dump, which copies any memory page into a host page,\n"
    "\t  and /sys/kernel/debug/pkvm_el2dump/dump, through which the pkvm-harness reads the\n"
    "\t  hypervisor's allocator and page tables on a board. It discloses guest memory: never\n"
    "\t  enable it in a kernel that runs anything but the pkvm-harness's tests.\n",
    files=((HERE / "el2dump" / "pkvm_el2dump.c", "arch/arm64/kvm/pkvm_el2dump.c"),
           (HERE / "el2dump" / "el2_dump.c", "arch/arm64/kvm/hyp/nvhe/el2_dump.c"),
           (HERE / "el2dump" / "pkh_events.h", "arch/arm64/kvm/hyp/include/nvhe/pkh_events.h")),
    edits=(
        Insert("arch/arm64/kvm/Makefile", "obj-$(CONFIG_PKVM_EL2_DUMP) += pkvm_el2dump.o\n", r"\Z"),
        Insert("arch/arm64/kvm/hyp/nvhe/Makefile", "hyp-obj-$(CONFIG_PKVM_EL2_DUMP) += el2_dump.o\n",
               r"^hyp-obj-y \+= \$\(lib-objs\)"),
        # 6.1: EL2 copies through its linear map and a page the host shares with it (el2_dump.c),
        # names the host stage-2 host_kvm, and has u32 page-table levels
        *(Insert(path, line, r"\Z", unless=fact) for path, line, fact in (
            ("arch/arm64/kvm/Makefile", "CFLAGS_pkvm_el2dump.o += -DPKH_NO_HYP_FIXMAP\n", "has_hyp_fixmap"),
            ("arch/arm64/kvm/hyp/nvhe/Makefile", "ccflags-y += -DPKH_NO_HYP_FIXMAP\n", "has_hyp_fixmap"),
            ("arch/arm64/kvm/hyp/nvhe/Makefile", "ccflags-y += -DPKH_HOST_KVM\n", "has_host_mmu"),
            ("arch/arm64/kvm/hyp/nvhe/Makefile", "ccflags-y += -DPKH_U32_LEVELS\n", "pgtable_levels_signed"))),
        # the last host hypercall: no other's number moves (6.12 ends the enum with `};`, 7.x with a MARKER)
        Insert("arch/arm64/include/asm/kvm_asm.h", f"\t__KVM_HOST_SMCCC_FUNC_{DUMP_HYPERCALL},\n",
               r"^\s*(MARKER\(__KVM_HOST_SMCCC_FUNC_MAX\)|\};)", after=r"^enum __kvm_host_smccc_func \{"),
        Insert("arch/arm64/kvm/hyp/nvhe/hyp-main.c",
               f"void handle_{DUMP_HYPERCALL}(struct kvm_cpu_context *host_ctxt);\n\n",
               r"^static const hcall_t host_hcall\[\] = \{"),
        Insert("arch/arm64/kvm/hyp/nvhe/hyp-main.c", f"\tHANDLE_FUNC({DUMP_HYPERCALL}),\n", r"^\};",
               after=r"^static const hcall_t host_hcall\[\] = \{"),
        *EVENTS,
    ))
OVERLAYS = (HOSTILE_HOST, EL2_DUMP)


def patches_for(requested: dict[str, ConfigOption], tree: Path, cache_dir: Path, version: KernelVersion) -> list[Path]:
    """One patch that adds every overlay the config enables, for this tree (written once, cached
    by content); none when it enables none. One patch, because overlays edit the same files (both
    append to arch/arm64/kvm/Makefile and Kconfig): each overlay's edits go onto the text the one
    before left, where two patches made against the pristine tree would not both apply."""
    chosen = [o for o in OVERLAYS if (opt := requested.get(o.symbol)) is not None and opt.value == "y"]
    if not chosen:
        return []
    changed: dict[str, list[str]] = {}
    for overlay in chosen:
        edits = [Insert(f"{overlay.kconfig_dir}/Kconfig", overlay.kconfig, r"\Z"),
                 *(e for e in overlay.edits if e.applies_to(version))]
        for edit in edits:
            lines = changed.get(edit.path)
            if lines is None:
                lines = changed[edit.path] = (tree / edit.path).read_text().splitlines(keepends=True)
            at = _position(lines, edit, overlay.symbol)
            lines[at:at] = edit.text.splitlines(keepends=True)
    diff = "".join(
        [line for rel, new in changed.items()
         for line in difflib.unified_diff((tree / rel).read_text().splitlines(keepends=True), new,
                                          f"a/{rel}", f"b/{rel}")]
        + [line for overlay in chosen for src, rel in overlay.files
           for line in difflib.unified_diff([], src.read_text().splitlines(keepends=True), "/dev/null", f"b/{rel}")])
    digest = hashlib.sha256(diff.encode()).hexdigest()[:16]
    path = cache_dir / "overlays" / f"{'+'.join(o.symbol.lower() for o in chosen)}-{digest}.patch"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, diff)
    return [path]


def _position(lines: list[str], edit: Insert, symbol: str) -> int:
    start = 0
    if edit.after:
        start = next((i + 1 for i, line in enumerate(lines) if re.search(edit.after, line)), -1)
    if start >= 0 and edit.before == r"\Z":
        return len(lines)
    found = next((i for i in range(max(start, 0), len(lines)) if re.search(edit.before, lines[i])), None)
    if start < 0 or found is None:
        raise UsageError(f"CONFIG_{symbol} cannot be added to this kernel: {edit.path} has no line matching "
                         f"{edit.after + ' ... ' if edit.after else ''}{edit.before}",
                         hint="this kernel version is not one the overlay knows: see docs/boards.md")
    return found
