"""The EL2 dump's parts that need no machine: its patch on each kernel shape, its file format."""

from __future__ import annotations

import struct
import subprocess

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


def _tree(tmp_path, enum: str):
    tree = tmp_path / "linux"
    files = {
        "arch/arm64/kvm/Kconfig": "config KVM\n\tbool \"KVM\"\n",
        "arch/arm64/kvm/Makefile": "obj-$(CONFIG_KVM) += kvm.o\n",
        "arch/arm64/kvm/hyp/nvhe/Makefile": "hyp-obj-y := hyp-main.o\nhyp-obj-y += $(lib-objs)\nobj-y := kvm_nvhe.o\n",
        "arch/arm64/include/asm/kvm_asm.h": "#define X 1\n" + enum + "struct other {\n};\n",
        "arch/arm64/kvm/hyp/nvhe/hyp-main.c": "static void f(void)\n{\n};\nstatic const hcall_t host_hcall[] = {\n"
                                              "\tHANDLE_FUNC(__pkvm_teardown_vm),\n};\n",
    }
    for rel, text in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    return tree


@pytest.mark.parametrize("enum", [ENUM_6_12, ENUM_7_X], ids=["6.12", "7.x"])
def test_the_dump_hypercall_is_the_last_and_has_its_handler(tmp_path, enum):
    tree = _tree(tmp_path, enum)
    [patch] = patches_for(ASKED, tree, tmp_path / "cache", V6_12)
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
    assert main.startswith("static void f(void)\n{\n};\n")             # the first `};` untouched
    nvhe = (tree / "arch/arm64/kvm/hyp/nvhe/Makefile").read_text()
    assert nvhe.index("hyp-obj-$(CONFIG_PKVM_EL2_DUMP) += el2_dump.o") < nvhe.index("hyp-obj-y += $(lib-objs)")
    assert (tree / "arch/arm64/kvm/hyp/nvhe/el2_dump.c").is_file()
    assert (tree / "arch/arm64/kvm/pkvm_el2dump.c").is_file()


def test_a_tree_without_the_anchor_is_refused_in_one_line(tmp_path):
    tree = _tree(tmp_path, "enum something_else {\n};\n")
    with pytest.raises(UsageError, match="CONFIG_PKVM_EL2_DUMP cannot be added to this kernel: .*kvm_asm.h"):
        patches_for(ASKED, tree, tmp_path / "cache", V6_12)
    assert EL2_DUMP.symbol == "PKVM_EL2_DUMP"


def test_a_kernel_without_the_hyp_fixmap_is_refused_in_one_line(tmp_path):
    tree = _tree(tmp_path, ENUM_6_12)
    with pytest.raises(UsageError, match=r"PKVM_EL2_DUMP cannot be added to Linux 6\.1\.192: it has no hyp fixmap"):
        patches_for(ASKED, tree, tmp_path / "cache", KernelVersion.parse("6.1.192"))


def _blob(kvo: int, records: list[tuple[int, int, int]], data: bytes) -> bytes:
    return (HEADER.pack(MAGIC, kvo, len(records), len(data) // 4096, 7)
            + b"".join(RECORD.pack(*r) for r in records) + data)


def test_a_dump_parses_into_pages_zeros_and_refusals():
    page = bytes(range(256)) * 16
    d = parse(_blob(0x1234, [(0x1000, 1, 0), (0x2000, 2, 1), (0x4000, 1, -22)], page))
    assert (d.kimage_voffset, d.seq) == (0x1234, 7)
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
