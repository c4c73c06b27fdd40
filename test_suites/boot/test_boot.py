"""Boot suite: pKVM came up, in the mode expected, with a clean log and the hyp memory that
kvm_hyp_reserve() should have reserved for this machine's memory."""

from __future__ import annotations

import re

import pytest

from harness.model.sizing import hyp_reserve
from harness.targets.guests import guest_args, run_guests
from harness.targets.hyp_trace import HypTraceRemote
from harness.verdict import clean, scan

RESERVED_RE = re.compile(r"kvm \[\d+\]: Reserved (\d+) MiB at (0x[0-9a-f]+)")
HYP_TROUBLE_RE = re.compile(r"\bhyp\b.*\b(error|fail|failed|panic|BUG|corrupt)", re.IGNORECASE)


def test_pkvm_is_up_in_the_expected_mode(target, expected_pkvm_mode):
    assert re.search(r"(^|\s)kvm-arm\.mode=protected(\s|$)", target.run("cat /proc/cmdline").check().stdout)
    mode = target.pkvm_mode()
    assert mode is not None, "no 'Protected ... mode initialized successfully' in dmesg"
    if expected_pkvm_mode:
        assert mode == expected_pkvm_mode
    else:
        assert mode in ("nVHE", "hVHE")


def test_dmesg_has_no_warning_bug_or_hyp_trouble(target):
    lines = clean(target.dmesg())
    events = scan(lines)
    assert events == [], "\n".join(f"{e.kind}: {e.line}" for e in events)
    trouble = [line for line in lines if HYP_TROUBLE_RE.search(line)]
    assert trouble == []


@pytest.mark.needs_el2
def test_reserved_hyp_memory_is_what_kvm_hyp_reserve_computes(target, el2):
    m = RESERVED_RE.search(target.dmesg())
    assert m, "no 'kvm [N]: Reserved N MiB at 0x...' line in dmesg"
    snap = el2.snapshot()
    want = hyp_reserve([(base, size) for base, size, _ in snap.memblocks], el2.kernel.kernel_version,
                       el2.kernel.struct("hyp_page").size)
    assert (int(m.group(1)), int(m.group(2), 16)) == (want.mib, snap.carveout[0]), \
        f"model: {want.pages} pages = {want} -> {want.mib} MiB"
    assert snap.carveout[1] == want.bytes


def _el2_debug(kernel_config) -> bool:
    if kernel_config is None:
        pytest.skip("the kernel's .config is not known here (no /proc/config.gz on this board)")
    return kernel_config.get("NVHE_EL2_DEBUG") == "y"


@pytest.mark.needs_el2
def test_upstream_ownership_selftest_ran_at_el2_init(target, el2, kernel_config):
    """7.x with NVHE_EL2_DEBUG: EL2 init runs pkvm_ownership_selftest, which walks one page through
    every ownership transition and asserts each result and state. It ran: its page pointer is
    set and the page is where its last step left it (donated to the hyp, then freed into
    host_s2_pool). It passed: a failed assertion is a hyp panic at boot, and this boot got here."""
    version = el2.kernel.kernel_version
    if not version.has_ownership_selftest:
        pytest.skip(f"Linux {version} has no pkvm_ownership_selftest")
    compiled = "__kvm_nvhe_pkvm_ownership_selftest" in el2.kernel.symbols
    assert compiled == _el2_debug(kernel_config), "the selftest is built exactly when NVHE_EL2_DEBUG is"
    if not compiled:
        pytest.skip("built with --el2-debug off (no NVHE_EL2_DEBUG): no ownership selftest")
    page_va = el2.mem.u64(el2.kpa("__kvm_nvhe_selftest_page"))
    assert page_va, "pkvm_ownership_selftest never ran: selftest_page is NULL"
    snap = el2.snapshot()
    pa = ((page_va - snap.vmemmap_va) // snap.hyp_page_shape["size"]) << 12
    pool = snap.pools["host_s2_pool"]
    assert pool.range_start <= pa < pool.range_end, f"selftest page {pa:#x} is not a host_s2_pool page"
    assert (snap.host_state(pa), snap.hyp_state(pa)) == ("NOPAGE", "OWNED"), f"selftest page {pa:#x}"
    assert "nVHE hyp BUG" not in target.dmesg()


def test_the_hypervisor_trace_remote_records_a_vm_entering_el2(target, payload, kernel_version, kernel_config,
                                                               pkvm_run_dir):
    """7.x with NVHE_EL2_DEBUG: the hypervisor traces into tracefs (remotes/hypervisor). Read
    through the target's shell (QEMU or board) around one VM's life: every CPU enters and leaves
    EL2, the guest's vCPU among them; the text is kept in the run directory (hyp-trace.txt)."""
    if not kernel_version.has_hyp_trace_remote:
        pytest.skip(f"Linux {kernel_version} has no hypervisor trace remote")
    remote = HypTraceRemote(target)
    present = remote.present()
    assert present == _el2_debug(kernel_config), "the trace remote exists exactly when NVHE_EL2_DEBUG is on"
    if not present:
        pytest.skip("built with --el2-debug off (no NVHE_EL2_DEBUG): no hypervisor trace remote")
    assert {"hyp_enter", "hyp_exit", "selftest"} <= set(remote.events())
    remote.start()
    run_guests(target, payload("pkvm_guest"), guest_args(vms=1, vcpus=1, pages=4))
    remote.stop()
    text, events = remote.read()
    (pkvm_run_dir / "hyp-trace.txt").write_text(text)
    reasons = {(e.name, e.fields.get("reason")) for e in events}
    assert ("hyp_enter", "guest_exit") in reasons and ("hyp_exit", "eret_guest") in reasons, sorted(reasons)
    guest = [e for e in events if e.fields.get("reason") in ("guest_exit", "eret_guest")]
    assert all(e.fields.get("vcpu", "0") != "0" for e in guest), "a guest entry without its vCPU thread"
    assert [e.time_us for e in events if e.cpu == guest[0].cpu] == sorted(
        e.time_us for e in events if e.cpu == guest[0].cpu), "one CPU's events out of time order"


@pytest.mark.parametrize("symbol,where", [("PKVM_HOSTILE_HOST", "/sys/kernel/debug/pkvm_hostile"),
                                          ("PKVM_EL2_DUMP", "/sys/kernel/debug/pkvm_el2dump")])
def test_only_a_test_kernel_has_the_harness_interfaces(target, kernel_config, symbol, where):
    """The hostile host (user space issuing any hypercall) and the EL2 dump (user space reading
    any page, the hypervisor's included) are built only under the harness's own fragments
    (harness/kernel/overlays.py adds their code then): the default fragments never ask for them,
    and a kernel without the symbol has no such files."""
    from harness.kernel.config import DEFAULT_FRAGMENTS, FRAGMENTS_DIR
    from harness.kernel.overlays import OVERLAYS

    assert symbol in {o.symbol for o in OVERLAYS}
    assert not any(symbol in (FRAGMENTS_DIR / f).read_text() for f in DEFAULT_FRAGMENTS)
    assert target.run("grep -q debugfs /proc/mounts").ok, "debugfs is not mounted: its absence would prove nothing"
    present = target.run(f"test -e {where}").ok
    if kernel_config is None:
        assert not present, f"{where} exists on a board whose kernel config cannot be read: is it a test kernel?"
        return
    built = kernel_config.get(symbol) == "y"
    assert present == built, f"{where} {'exists' if present else 'is missing'} with CONFIG_{symbol} " \
        f"{'set' if built else 'unset'}"
