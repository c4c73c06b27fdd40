"""QEMU 10 is the default; Debian 12's QEMU 7.2 keeps working through --qemu PATH, with the gdbstub
tracer (it cannot run el2trace)."""

from __future__ import annotations

import pytest

from harness.commands.trace import trace_command
from harness.el2.tcg.build import qemu_info
from harness.errors import UsageError
from harness.image.payloads import GUEST_DIR
from harness.options import BootOptions, KernelOptions
from harness.targets.qemu_debian12 import qemu_7_2
from tests.integration.conftest import assembled, qemu_pids_mentioning


@pytest.fixture(scope="module")
def old_qemu(cache_dir) -> str:
    return str(qemu_7_2(cache_dir))


def test_the_default_qemu_runs_el2trace(kernel, cache_dir, tmp_path):
    assert qemu_info("qemu-system-aarch64").has_plugins
    assert assembled(cache_dir, tmp_path).spec.plugin is not None


def test_qemu_7_2_boots_and_traces_through_the_gdbstub(kernel, cache_dir, tmp_path, old_qemu):
    assert qemu_info(old_qemu).version[:2] == (7, 2)
    out = trace_command(KernelOptions(), BootOptions(qemu=old_qemu), cache_dir, tmp_path,
                        f"{GUEST_DIR}/pkvm_guest --vms 1 --vcpus 2", quiet=True)
    assert out.trace.initial is not None                   # a gdbstub window, not a trace from power-on
    assert not (out.run_dir / "el2trace.bin").exists()
    assert out.replay.ok and len(out.trace.ops) > 20
    assert not qemu_pids_mentioning(str(tmp_path))


def test_el2trace_on_refuses_qemu_7_2_in_one_line(kernel, cache_dir, tmp_path, old_qemu):
    with pytest.raises(UsageError) as e:
        assembled(cache_dir, tmp_path, qemu=old_qemu, el2_plugin="on")
    assert "QEMU 7.2" in e.value.one_line() and "--el2-plugin off" in e.value.one_line()
    assert "\n" not in e.value.one_line()


def test_qemu_7_2_fails_an_el2_allocation_through_the_gdbstub(kernel, cache_dir, tmp_path, old_qemu):
    from harness.commands.inject import InjectRequest, inject_command
    from harness.el2.inject import Plan

    out = inject_command(KernelOptions(), BootOptions(qemu=old_qemu), cache_dir, tmp_path,
                         InjectRequest(plan=Plan("hyp_alloc_pages", 2, "vm")), quiet=True)
    assert out.data["failed"].startswith("hyp_alloc_pages call 2 in vm from reclaim_guest_pages")
    assert out.data["verdict"] == "leaked" and out.data["explained"]
    assert not qemu_pids_mentioning(str(tmp_path))
