"""Linux 7.3 (Debian's linux-source-7.3, fetched once from trixie-backports: `--kernel 7.3`): the
same fragments plus the options 7.x renamed or dropped (KernelVersion.config_fragments), built,
booted in both pKVM modes, and its KVM selftests found under arm64/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.image.payloads import build_payloads, selftest_names
from harness.kernel.build import build
from harness.kernel.version import KernelVersion
from harness.machine import build_request
from harness.options import KernelOptions
from harness.report.schema import problems
from tests.integration.conftest import run_cli


@pytest.fixture(scope="module")
def request_7_3(cache_dir):
    return build_request(KernelOptions(kernel="7.3"), cache_dir, quiet=True)


@pytest.fixture(scope="module")
def kernel_7_3(request_7_3):
    return build(request_7_3)


def _only_run(runs_dir: Path) -> dict:
    (run_dir,) = [p for p in runs_dir.iterdir() if p.is_dir() and not p.is_symlink()]
    return json.loads((run_dir / "result.json").read_text())


def test_the_7_3_kernel_is_built_with_the_options_as_7_x_names_them(kernel_7_3):
    assert kernel_7_3.meta["version"].startswith("7.3.")
    config = kernel_7_3.config.read_text()
    for option in ("CONFIG_KVM=y", "CONFIG_NVHE_EL2_DEBUG=y", "CONFIG_PKVM_STACKTRACE=y",
                   "CONFIG_PKVM_DISABLE_STAGE2_ON_PANIC=y", "CONFIG_JUMP_LABEL=y"):
        assert option in config, option
    assert "CONFIG_PROTECTED_NVHE_STACKTRACE" not in config and "CONFIG_ARM64_PAN" not in config


@pytest.mark.parametrize("cpu, mode", [("max", "hVHE"), ("cortex-a72", "nVHE")])
def test_7_3_boots_protected_in_the_mode_of_its_cpu(kernel_7_3, tmp_path, cpu, mode):
    r = run_cli("run", "--kernel", "7.3", "--cpu", cpu, "--expect-mode", mode, "-q", "--runs-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    result = _only_run(tmp_path)
    assert result["boot"]["pkvm_mode"] == mode and result["kernel"]["version"] == kernel_7_3.meta["version"]
    assert problems(result) == []


def test_the_kvm_selftests_of_7_3_are_built_from_arm64(request_7_3, kernel_7_3):
    payloads = build_payloads(request_7_3, kernel_7_3)
    names = selftest_names(KernelVersion.parse(kernel_7_3.meta["version"]))
    assert "arm64/set_id_regs" in names and len(names) == len(selftest_names())   # 7.3 runs the whole list
    for name in names:                   # the list's names, built from the tree's arm64/ directory
        assert payloads.path(f"kvm-selftests/{name}").is_file(), name
    assert any(n.startswith("arm64/") for n in selftest_names())


def test_el2_of_7_3_reads_whole_and_every_invariant_holds_with_vms_alive(kernel_7_3, tmp_path):
    """Pools, vmemmap, host stage-2 (typed invalid PTEs, stage-1 memory types, the read-only hyp
    text), hyp stage-1 and two live VMs with their pools: nothing unavailable, 0 findings."""
    hold = "(/opt/pkvm-harness/bin/pkvm_guest --vms 2 --hold 30 >/dev/null 2>&1 &); sleep 8"
    r = run_cli("inspect", "--kernel", "7.3", "--check", "--json", "-q", "--run", hold, "--runs-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    snap = json.loads(r.stdout)
    assert snap["unavailable"] == {} and snap["absent"] == {} and snap["findings"] == []
    assert len(snap["vms"]) == 2 and {v["pool"] for v in snap["vms"]} <= set(snap["pools"])
    assert snap["invariants_not_applicable"] == {} and len(snap["invariants_ran"]) >= 17
    assert snap["page_states"]["host NOPAGE / hyp OWNED"] > 1000 and snap["page_states"]["shared with guests"] > 0
    assert all(vm["s2_leaves"] > 0 for vm in snap["vms"])
    assert snap["hyp_text"][0] < snap["hyp_text"][1]
    assert any("DONATION owner=hyp" in r["kind"] for r in snap["host_s2"]["ranges"])
