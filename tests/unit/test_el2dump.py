"""The EL2 dump's parts that need no machine: its patch on each kernel shape, its file format."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from harness.el2.dump import HEADER, MAGIC, RECORD, BadDump, DumpView, parse, runs
from harness.errors import UsageError
from harness.kernel.config import ConfigOption
from harness.kernel.overlays import EL2_DUMP, patches_for
from harness.kernel.version import KernelVersion

ASKED = {"PKVM_EL2_DUMP": ConfigOption("PKVM_EL2_DUMP", "y", "a fragment")}
ENUM_6_12 = "enum __kvm_host_smccc_func {\n\t__KVM_HOST_SMCCC_FUNC___pkvm_teardown_vm,\n};\n"
ENUM_7_X = ("enum __kvm_host_smccc_func {\n\t__KVM_HOST_SMCCC_FUNC___pkvm_tlb_flush_vmid,\n\n"
            "\tMARKER(__KVM_HOST_SMCCC_FUNC_MAX)\n};\n")

V6_12 = KernelVersion.parse("6.12.117")
V7_3 = KernelVersion.parse("7.3.4")
PAGE_ALLOC = """#include <asm/kvm_hyp.h>
#include <nvhe/gfp.h>

void hyp_put_page(struct hyp_pool *pool, void *addr)
{
\tstruct hyp_page *p = hyp_virt_to_page(addr);

\thyp_spin_lock(&pool->lock);
\thyp_page_ref_dec(pool, p);
\thyp_spin_unlock(&pool->lock);
}

void hyp_get_page(struct hyp_pool *pool, void *addr)
{
\tstruct hyp_page *p = hyp_virt_to_page(addr);

\thyp_spin_lock(&pool->lock);
\thyp_page_ref_inc(p);
\thyp_spin_unlock(&pool->lock);
}

void hyp_split_page(struct hyp_page *p)
{
\tp->order = 0;
}

void *hyp_alloc_pages(struct hyp_pool *pool, unsigned short order)
{
\tif (i > pool->max_order) {
\t\thyp_spin_unlock(&pool->lock);
\t\treturn NULL;
\t}
\treturn hyp_page_to_virt(p);
}

int hyp_pool_init(struct hyp_pool *pool, u64 pfn, unsigned int nr_pages, unsigned int reserved_pages)
{
\thyp_spin_lock_init(&pool->lock);
\treturn 0;
}
"""
HYP_MAIN = """#include <nvhe/trap_handler.h>

static void f(void)
{
};
static const hcall_t host_hcall[] = {
\tHANDLE_FUNC(__pkvm_teardown_vm),
};

static void handle_host_hcall(struct kvm_cpu_context *host_ctxt)
{
\thfn(host_ctxt);

\treturn;
}
"""
HYPEVENTS = "#if 0\nHYP_EVENT(selftest,\n\tHE_PROTO(u64 id)\n);\n#endif\n"
# each transition function as 6.12 has it: both locks, one unlock path (6.1 has the share pair only)
_LOCKED = "\thost_lock_component();\n\thyp_lock_component();\n\n\tret = do_it();\n\n" \
    "unlock:\n\thyp_unlock_component();\n\thost_unlock_component();\n\n\treturn ret;\n}}\n\n"
_SHARE_PAIR = ("int __pkvm_host_share_hyp(u64 pfn)\n{{\n\tint ret;\n\n" + _LOCKED
               + "int __pkvm_host_unshare_hyp(u64 pfn)\n{{\n\tint ret;\n\n" + _LOCKED)
MEM_PROTECT = "#include <nvhe/memory.h>\n#include <nvhe/mm.h>\n\n" + "".join(
    (f"{sig}\n{{{{\n\tu64 start = 0, end = 0;\n\tint ret;\n\n" + _LOCKED).format()
    for sig in ("int __pkvm_host_share_hyp(u64 pfn)", "int __pkvm_host_unshare_hyp(u64 pfn)",
                "int __pkvm_host_donate_hyp(u64 pfn, u64 nr_pages)",
                "int __pkvm_hyp_donate_host(u64 pfn, u64 nr_pages)", "int hyp_pin_shared_mem(void *from, void *to)",
                "void hyp_unpin_shared_mem(void *from, void *to)"))
MEM_PROTECT_6_1 = "#include <nvhe/memory.h>\n#include <nvhe/mm.h>\n\n" + _SHARE_PAIR.format()


def _tree(tmp_path, enum: str, mem_protect: str = MEM_PROTECT):
    tree = tmp_path / "linux"
    files = {
        "arch/arm64/kvm/Kconfig": "config KVM\n\tbool \"KVM\"\n",
        "arch/arm64/kvm/Makefile": "obj-$(CONFIG_KVM) += kvm.o\n",
        "arch/arm64/kvm/hyp/nvhe/Makefile": "hyp-obj-y := hyp-main.o\nhyp-obj-y += $(lib-objs)\nobj-y := kvm_nvhe.o\n",
        "arch/arm64/include/asm/kvm_asm.h": "#define X 1\n" + enum + "struct other {\n};\n",
        "arch/arm64/kvm/hyp/nvhe/hyp-main.c": HYP_MAIN,
        "arch/arm64/kvm/hyp/nvhe/page_alloc.c": PAGE_ALLOC,
        "arch/arm64/include/asm/kvm_hypevents.h": HYPEVENTS,
        "arch/arm64/kvm/hyp/nvhe/mem_protect.c": mem_protect,
    }
    for rel, text in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    return tree


@pytest.mark.parametrize("enum, version", [(ENUM_6_12, V6_12), (ENUM_7_X, V7_3)], ids=["6.12", "7.x"])
def test_the_dump_hypercall_is_the_last_and_has_its_handler(tmp_path, enum, version):
    tree = _tree(tmp_path, enum)
    [patch] = patches_for(ASKED, tree, tmp_path / "cache", version)
    r = subprocess.run(["patch", "-p1", "--batch", "-d", str(tree), "-i", str(patch)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    asm = (tree / "arch/arm64/include/asm/kvm_asm.h").read_text()
    members = [line.strip() for line in asm.split("enum __kvm_host_smccc_func {")[1].split("};")[0].splitlines()
               if line.strip()]
    assert members[-2 if "MARKER" in enum else -1] == "__KVM_HOST_SMCCC_FUNC___pkvm_el2_dump,"
    assert "struct other {\n};" in asm                                   # the other `};` untouched
    main = (tree / "arch/arm64/kvm/hyp/nvhe/hyp-main.c").read_text()
    assert main.index("void handle___pkvm_el2_dump(") < main.index("static const hcall_t host_hcall[]")
    assert "\tHANDLE_FUNC(__pkvm_teardown_vm),\n\tHANDLE_FUNC(__pkvm_el2_dump),\n};" in main
    assert "static void f(void)\n{\n};\n" in main                      # the first `};` untouched
    nvhe = (tree / "arch/arm64/kvm/hyp/nvhe/Makefile").read_text()
    assert nvhe.index("hyp-obj-$(CONFIG_PKVM_EL2_DUMP) += el2_dump.o") < nvhe.index("hyp-obj-y += $(lib-objs)")
    assert (tree / "arch/arm64/kvm/hyp/nvhe/el2_dump.c").is_file()
    assert (tree / "arch/arm64/kvm/pkvm_el2dump.c").is_file()
    assert (tree / "arch/arm64/kvm/hyp/include/nvhe/pkh_events.h").is_file()


@pytest.mark.parametrize("version", [V6_12, V7_3], ids=["6.12", "7.x"])
def test_every_allocator_call_reports_itself_and_only_7_x_gets_trace_events(tmp_path, version):
    """The same call sites on every kernel (pkh_events.h sends them to the trace remote or to the
    ring); the HYP_EVENT definitions only where a trace remote is."""
    tree = _tree(tmp_path, ENUM_6_12)
    [patch] = patches_for(ASKED, tree, tmp_path / "cache", version)
    r = subprocess.run(["patch", "-p1", "--batch", "-d", str(tree), "-i", str(patch)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    alloc = (tree / "arch/arm64/kvm/hyp/nvhe/page_alloc.c").read_text()
    assert alloc.index("#include <nvhe/pkh_events.h>") < alloc.index("#include <nvhe/gfp.h>")
    for function, call in [("hyp_put_page", "pkh_ev_put(hyp_virt_to_phys(pool), hyp_virt_to_phys(addr), "),
                           ("hyp_get_page", "pkh_ev_get(hyp_virt_to_phys(pool), hyp_virt_to_phys(addr), "),
                           ("hyp_split_page", "pkh_ev_split(hyp_page_to_phys(p));\n\tp->order = 0;"),
                           ("hyp_alloc_pages", "pkh_ev_alloc(hyp_virt_to_phys(pool), order, 0);\n\t\treturn NULL;"),
                           ("hyp_alloc_pages", "pkh_ev_alloc(hyp_virt_to_phys(pool), order, hyp_page_to_phys(p));"),
                           ("hyp_pool_init", "pkh_ev_pool_init(hyp_virt_to_phys(pool), pfn, nr_pages, ")]:
        body = alloc.split(f"{function}(struct")[1].split("\n}\n")[0]
        assert call in body, (function, body)
    # get and put report before taking the pool lock, as the gdbstub sees them at entry
    get = alloc.split(" hyp_get_page(")[1]
    assert get.index("pkh_ev_get") < get.index("hyp_spin_lock")
    main = (tree / "arch/arm64/kvm/hyp/nvhe/hyp-main.c").read_text()
    assert "#include <nvhe/pkh_events.h>\n#include <nvhe/trap_handler.h>" in main
    assert main.index("pkh_ev_hcall(id,") < main.index("\thfn(host_ctxt);") < main.index("pkh_ev_hcall_ret(id,")
    events = (tree / "arch/arm64/include/asm/kvm_hypevents.h").read_text()
    assert ("HYP_EVENT(pkh_alloc," in events) == (version == V7_3)


@pytest.mark.parametrize("version", [KernelVersion.parse("6.1.192"), V6_12, V7_3], ids=["6.1", "6.12", "7.x"])
def test_every_transition_reports_itself_under_both_locks(tmp_path, version):
    """Each transition function records its call at its end, before the hyp lock is released (the
    ring's order is then the order they took effect); the hyp's giving back is scanned before it
    takes a lock. 6.1 has only the share pair: it gets only theirs."""
    donations = version.has_host_hyp_donations
    tree = _tree(tmp_path, ENUM_6_12, MEM_PROTECT if donations else MEM_PROTECT_6_1)
    [patch] = patches_for(ASKED, tree, tmp_path / "cache", version)
    r = subprocess.run(["patch", "-p1", "--batch", "-d", str(tree), "-i", str(patch)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (tree / "arch/arm64/kvm/hyp/nvhe/mem_protect.c").read_text()
    assert "#include <nvhe/pkh_events.h>\n#include <nvhe/mm.h>" in text
    calls = {"__pkvm_host_share_hyp": "PKH_SHARE_HYP, hyp_pfn_to_phys(pfn), 1, ret",
             "__pkvm_host_unshare_hyp": "PKH_UNSHARE_HYP, hyp_pfn_to_phys(pfn), 1, ret"}
    if donations:
        calls |= {"__pkvm_host_donate_hyp": "PKH_DONATE_HYP, hyp_pfn_to_phys(pfn), nr_pages, ret",
                  "__pkvm_hyp_donate_host": "PKH_HYP_DONATE_HOST, hyp_pfn_to_phys(pfn), nr_pages, ret",
                  "hyp_pin_shared_mem": "PKH_PIN, __hyp_pa(start), (end - start) >> PAGE_SHIFT, ret",
                  "hyp_unpin_shared_mem": "PKH_UNPIN, __hyp_pa(start), (end - start) >> PAGE_SHIFT, 0"}
    assert text.count("pkh_ev_xfer(") == len(calls)
    for function, args in calls.items():
        body = text.split(f" {function}(")[1].split("\n}\n")[0]
        assert f"unlock:\n\tpkh_ev_xfer({args});\n\thyp_unlock_component();" in body, (function, body)
    assert ("\tpkh_ev_giving_back(hyp_pfn_to_phys(pfn), nr_pages);\n\thost_lock_component();" in text) == donations


def test_a_tree_without_the_anchor_is_refused_in_one_line(tmp_path):
    tree = _tree(tmp_path, "enum something_else {\n};\n")
    with pytest.raises(UsageError, match="CONFIG_PKVM_EL2_DUMP cannot be added to this kernel: .*kvm_asm.h"):
        patches_for(ASKED, tree, tmp_path / "cache", V6_12)
    assert EL2_DUMP.symbol == "PKVM_EL2_DUMP"


def test_a_kernel_without_the_hyp_fixmap_copies_through_a_shared_page(tmp_path):
    """6.1 has no hyp fixmap: both halves are built with PKH_NO_HYP_FIXMAP (el2_dump.c copies
    through the hyp's linear map into a page the host shared). Its host stage-2's name and its
    page-table levels' type are two more differences, each from a fact of its own (6.6 has the
    fixmap and host_mmu, and u32 levels still)."""
    for version, no_fixmap, host_kvm, u32_levels in (("6.1.192", True, True, True), ("6.6.60", False, False, True),
                                                    ("6.12.117", False, False, False)):
        tree = _tree(tmp_path / version, ENUM_6_12)
        [patch] = patches_for(ASKED, tree, tmp_path / "cache", KernelVersion.parse(version))
        r = subprocess.run(["patch", "-p1", "--batch", "-d", str(tree), "-i", str(patch)], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        host = (tree / "arch/arm64/kvm/Makefile").read_text()
        nvhe = (tree / "arch/arm64/kvm/hyp/nvhe/Makefile").read_text()
        assert ("CFLAGS_pkvm_el2dump.o += -DPKH_NO_HYP_FIXMAP" in host) == no_fixmap, version
        assert ("ccflags-y += -DPKH_NO_HYP_FIXMAP" in nvhe) == no_fixmap, version
        assert ("ccflags-y += -DPKH_HOST_KVM" in nvhe) == host_kvm, version
        assert ("ccflags-y += -DPKH_U32_LEVELS" in nvhe) == u32_levels, version


def _blob(kvo: int, records: list[tuple[int, int, int]], data: bytes, ring: tuple[int, int] = (0, 0)) -> bytes:
    return (HEADER.pack(MAGIC, kvo, len(records), len(data) // 4096, 7, *ring)
            + b"".join(RECORD.pack(*r) for r in records) + data)


def test_a_dump_parses_into_pages_zeros_and_refusals():
    page = bytes(range(256)) * 16
    d = parse(_blob(0x1234, [(0x1000, 1, 0), (0x2000, 2, 1), (0x4000, 1, -22)], page, ring=(7430, 7432)))
    assert (d.kimage_voffset, d.seq, d.ring) == (0x1234, 7, (7430, 7432))
    assert d.pages == {0x1000: page, 0x2000: bytes(4096), 0x3000: bytes(4096)}
    assert d.refused == {0x4000: 22}
    assert d.read(0x1ff8, 16) == page[-8:] + bytes(8)
    with pytest.raises(OSError, match="refused .* 0x4000: errno 22"):
        d.read(0x4000, 8)
    view = DumpView(d)
    assert view.u64(0x5000) == 0 and view.missed == {0x5000}              # lacking: zeros, and asked for next
    view.load(0x1000, 0x6000)
    assert view.missed == {0x5000, 0x6000}


@pytest.mark.parametrize("blob", [b"", b"PKVMDMP0" + bytes(32), _blob(0, [(0x1000, 1, 0)], b"")])
def test_a_damaged_dump_is_refused(blob):
    with pytest.raises(BadDump):
        parse(blob)


def test_requests_go_out_as_runs():
    assert runs([0x3000, 0x1000, 0x2000, 0x9000, 0x2000]) == [(0x1000, 3), (0x9000, 1)]
    assert struct.calcsize("<QIi") == RECORD.size == 16


TRACE = """\
[000]\t    5.000001: pkh_alloc pool=0x7f2a0000 order=0 page=0x7f300000
[001]\t    5.000002: selftest id=5785797311124733956
[001]\t    5.000003: selftest id=5785798410636361732
[000]\t    5.100000: pkh_alloc pool=0x7f2a0000 order=1 page=0x0
[001]\t    5.100001: pkh_get pool=0x7f2a0000 page=0x7f301000 refcount=1 order=0
[000]\t    5.100002: pkh_put pool=0x7f2a0000 page=0x7f301000 refcount=2 order=0
[000]\t    5.100003: pkh_split page=0x7f302000
[001]\t    5.100004: pkh_pool_init pool=0x43000000 pfn=0x43001 nr_pages=16 reserved=1
[001]\t    5.200000: selftest id=5785797311124733957
[000]\t    5.200001: pkh_alloc pool=0x7f2a0000 order=0 page=0x7f303000
"""


def test_the_hypervisor_events_between_two_dump_marks_are_the_windows_calls():
    from harness.el2.dump import DUMP_END, DUMP_MARK
    from harness.el2.events import mark_index, ops_of, torn
    from harness.targets.hyp_trace import HypEvent

    events = [e for e in map(HypEvent.parse, TRACE.splitlines()) if e is not None]
    assert DUMP_MARK | 4 == 5785797311124733956
    assert DUMP_MARK | DUMP_END | 4 == 5785798410636361732
    begin, end = mark_index(events, 4, end=True), mark_index(events, 5)
    assert (mark_index(events, 4), begin, end, mark_index(events, 6)) == (1, 2, 8, None)
    assert torn(events, 4) == [] and torn(events, 5) is None     # dump 5 has no end mark: unknown, not clean
    ops = ops_of(events[begin + 1:end])
    assert [(o.cpu, o.pool, o.op, o.args, o.result, o.seen) for o in ops] == [
        (0, 0x7F2A0000, "alloc", {"order": 1}, None, None),
        (1, 0x7F2A0000, "get", {"addr": 0x7F301000}, None, [1, 0]),
        (0, 0x7F2A0000, "put", {"addr": 0x7F301000}, None, [2, 0]),
        (0, None, "split", {"addr": 0x7F302000}, None, None),
        (1, 0x43000000, "init", {"pfn": 0x43001, "nr_pages": 16, "reserved_pages": 1}, None, None)]
    assert [o.seq for o in ops] == list(range(5))


def test_a_dump_the_hypervisor_changed_while_copying_is_found():
    from harness.el2.dump import DUMP_END, DUMP_MARK
    from harness.el2.events import torn
    from harness.targets.hyp_trace import HypEvent

    lines = [f"[000]\t 1.000001: selftest id={DUMP_MARK | 9}",
             "[000]\t 1.000002: pkh_get pool=0x1000 page=0x2000 refcount=1 order=0",
             f"[000]\t 1.000003: selftest id={DUMP_MARK | DUMP_END | 9}"]
    events = [e for e in map(HypEvent.parse, lines) if e is not None]
    assert [e.name for e in torn(events, 9)] == ["pkh_get"]


def _ring_dump(ring_pa: int, events: dict[int, tuple], count: int, ring=None):
    """A dump of a ring's pages as the kernel lays them out, its header saying `count` events."""
    from harness.el2.dump import Dump
    from harness.el2.ring import ALLOCATOR, ENTRY

    ring = ring or ALLOCATOR
    pages: dict[int, bytearray] = {}
    for n, fields in events.items():
        at = ring_pa + ((n - 1) % ring.length) * ENTRY.size
        page = pages.setdefault(at & -4096, bytearray(4096))
        ENTRY.pack_into(page, at % 4096, *fields)
    packed = count << ring.shift
    return Dump(0, seq=3, pages={pa: bytes(b) for pa, b in pages.items()}, ring=(packed, packed))


def test_the_rings_entries_between_two_counts_are_the_windows_calls():
    """Events 10 .. 14 in the ring: the same Ops the trace remote's pkh_* events give (the TRACE
    above), in the ring's order, each with its CPU."""
    from harness.el2.ring import ALLOCATOR, entries, ops_of, slots

    ring = 0x4000_0000
    calls = {10: (10, 2, 0, 1, 0x7F2A0000, 0, 0, 0), 11: (11, 3, 1, 0, 0x7F2A0000, 0x7F301000, 1, 0),
             12: (12, 4, 0, 0, 0x7F2A0000, 0x7F301000, 2, 0), 13: (13, 5, 0, 0, 0, 0x7F302000, 0, 0),
             14: (14, 1, 1, 0, 0x43000000, 0x43001, 16, 1)}
    got = entries(_ring_dump(ring, calls, 14), ALLOCATOR, ring, 9, 14)
    from harness.el2.events import ops_of as events_ops_of
    from harness.targets.hyp_trace import HypEvent

    events = [e for e in map(HypEvent.parse, TRACE.splitlines()[3:8]) if e is not None]
    assert ops_of(got) == events_ops_of(events)
    assert slots(ALLOCATOR, ring, 9, 14) == [ring]
    # event n is in slot (n - 1) % length: a window across the ring's end reads its last and first pages
    n = ALLOCATOR.length
    assert slots(ALLOCATOR, ring, n - 1, n + 1) == [ring, ring + n * 32 - 4096]


def test_a_window_the_ring_no_longer_holds_is_refused():
    from harness.el2.ring import ALLOCATOR, TRANSITIONS, RingLost, entries

    ring, n = 0x4000_0000, ALLOCATOR.length
    overwritten = {5: (5 + n, 3, 0, 0, 0x1000, 0x2000, 1, 0)}      # slot of event 5, rewritten
    with pytest.raises(RingLost, match=f"holds event {5 + n} where event 5 was"):
        entries(_ring_dump(ring, overwritten, 5), ALLOCATOR, ring, 4, 5)
    with pytest.raises(RingLost, match=f"allocator calls holds {n}; {n + 1} were made"):
        entries(_ring_dump(ring, {}, n + 5), ALLOCATOR, ring, 4, 5)
    # the transitions' ring is apart: a million allocator calls leave its entries be
    m = TRANSITIONS.length
    with pytest.raises(RingLost, match=f"transitions and their hypercalls holds {m}; {m + 1} were made"):
        entries(_ring_dump(ring, {}, m + 5, TRANSITIONS), TRANSITIONS, ring, 4, 5)


def test_the_dumps_result_packs_both_rings_counts():
    """el2_dump.c's pkh_ring_events: the transitions' count above bit 40, the allocator's below;
    the result stays positive, as errors are negative."""
    from harness.el2.ring import ALLOCATOR, TRANSITIONS

    packed = 1234 << 40 | 1_046_693
    assert (ALLOCATOR.count(packed), TRANSITIONS.count(packed)) == (1_046_693, 1234)
    assert TRANSITIONS.shift + TRANSITIONS.bits == 63
    header = (Path(__file__).parents[2] / "harness/kernel/el2dump/pkh_events.h").read_text()
    for name, value in (("PKH_RING_LEN", ALLOCATOR.length), ("PKH_XRING_LEN", TRANSITIONS.length),
                        ("PKH_COUNT_BITS", TRANSITIONS.shift), ("PKH_XCOUNT_BITS", TRANSITIONS.bits)):
        assert f"#define {name} {value}\t" in header, name


def test_the_hostile_host_and_the_dump_compose_into_one_patch(tmp_path):
    """Both overlays append to arch/arm64/kvm/Makefile and Kconfig: two patches made against the
    pristine tree did not both apply (mutant 19 over SSH needs both)."""
    tree = _tree(tmp_path, ENUM_6_12)
    both = {**ASKED, "PKVM_HOSTILE_HOST": ConfigOption("PKVM_HOSTILE_HOST", "y", "a fragment")}
    [patch] = patches_for(both, tree, tmp_path / "cache", V6_12)
    r = subprocess.run(["patch", "-p1", "--batch", "-d", str(tree), "-i", str(patch)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    makefile = (tree / "arch/arm64/kvm/Makefile").read_text()
    assert "obj-$(CONFIG_PKVM_HOSTILE_HOST) += pkvm_hostile.o" in makefile
    assert "obj-$(CONFIG_PKVM_EL2_DUMP) += pkvm_el2dump.o" in makefile
    kconfig = (tree / "arch/arm64/kvm/Kconfig").read_text()
    assert "config PKVM_HOSTILE_HOST" in kconfig and "config PKVM_EL2_DUMP" in kconfig
