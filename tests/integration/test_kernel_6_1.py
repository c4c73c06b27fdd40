"""The 6.1 LTS kernel (Debian's linux-source-6.1, `--kernel 6.1`): the same fragments (plus
kernel_configs/pkvm-6.1.config), the same CLI, the same suites. 6.1 has no hVHE, no per-VM pools
and no vm_table, backs the vmemmap only for the carveout, and stores a 2^k pool's max_order one
higher than 6.12; each of these is checked against the live kernel here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.kernel.build import build
from harness.kernel.version import KernelVersion
from harness.machine import build_request
from harness.model.buddy import version_rules
from harness.model.sizing import memory_for_hpool_pages
from harness.options import KernelOptions
from harness.report.schema import problems
from tests.integration.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kernel_6_1(cache_dir):
    return build(build_request(KernelOptions(kernel="6.1"), cache_dir, quiet=True))


def _only_run(runs_dir: Path) -> tuple[Path, dict]:
    (run_dir,) = [p for p in runs_dir.iterdir() if p.is_dir() and not p.is_symlink()]
    return run_dir, json.loads((run_dir / "result.json").read_text())


def test_the_6_1_kernel_is_built_with_its_own_fragment(kernel_6_1):
    assert kernel_6_1.meta["version"].startswith("6.1.")
    config = kernel_6_1.config.read_text()
    assert "CONFIG_PROTECTED_NVHE_STACKTRACE=y" in config and "CONFIG_NVHE_EL2_DEBUG=y" in config


@pytest.mark.parametrize("cpu", ["max", "cortex-a72"])
def test_6_1_boots_protected_nvhe_on_every_cpu(kernel_6_1, tmp_path, cpu):
    r = run_cli("run", "--kernel", "6.1", "--cpu", cpu, "--expect-mode", "nvhe", "-q", "--runs-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    _, result = _only_run(tmp_path)
    assert result["boot"]["pkvm_mode"] == "nVHE" and result["kernel"]["version"] == kernel_6_1.meta["version"]
    assert problems(result) == []


def test_inspect_reads_6_1_and_lists_what_does_not_apply(kernel_6_1, tmp_path):
    r = run_cli("inspect", "--kernel", "6.1", "--check", "--json", "-q", "--runs-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    snap = json.loads(r.stdout)
    assert snap["unavailable"] == {} and "vm_table" in snap["absent"]
    assert set(snap["pools"]) == {"hpool", "host_s2_pool"}
    assert snap["model_rules"] == "5.17+" and snap["model_rules_warning"] is None
    not_applicable = snap["invariants_not_applicable"]
    assert not_applicable.keys() == {"vm-table", "page-state-pairs", "page-state-host-s2", "page-state-hyp-s1",
                                     "guest-share-count", "vm-s2-pages"}
    assert "from 6.2" in not_applicable["vm-table"] and "from 6.14" in not_applicable["guest-share-count"]
    assert len(snap["invariants_ran"]) >= 10 and snap["findings"] == []
    assert snap["host_s2"]["leaves_by_size"] and snap["host_s2"]["bytes_by_kind"]["hyp-owned"] > 0


@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
def test_a_1024_page_hpool_has_the_max_order_its_own_rules_predict(kernel_6_1, kernel, tmp_path):
    """The same pool, 2^10 pages, on both kernels: 6.1 stores max_order 11, 6.12 stores 10."""
    mem = memory_for_hpool_pages(1024, KernelVersion.parse(kernel))
    r = run_cli("inspect", "--kernel", kernel, "--mem", str(mem), "--json", "-q", "--runs-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    hpool = json.loads(r.stdout)["pools"]["hpool"]
    assert hpool["nr_pages"] == 1024
    predicted = version_rules(kernel).max_order(1024)
    assert hpool["max_order"] == predicted == {"6.1": 11, "6.12": 10}[kernel]
    assert max(int(k) for k in hpool["free_per_order"]) <= 10        # the largest block: order 10 on both


def test_the_suites_run_on_6_1_with_every_skip_explained(kernel_6_1, tmp_path):
    run_dir = tmp_path / "suites"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_suites/boot",
                        "test_suites/allocator", "test_suites/stage2", "--pkvm-kernel", "6.1",
                        "--pkvm-run-dir", str(run_dir)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert problems(result) == [] and result["kernel"]["version"].startswith("6.1.")
    assert result["target"]["pkvm_mode"] == "nVHE"
    outcomes = {t["nodeid"].split("::")[1]: t for t in result["tests"]}
    for name in ("test_vm_lifecycles_return_every_pool_to_its_baseline[1]",
                 "test_a_randomized_workload_replays_exactly", "test_every_invariant_holds_after_boot",
                 "test_reserved_hyp_memory_is_what_kvm_hyp_reserve_computes"):
        assert outcomes[name]["outcome"] == "passed", name
    skipped = {n: t["message"] for n, t in outcomes.items() if t["outcome"] == "skipped"}
    assert set(skipped) <= {"test_a_live_vm_shares_its_kvm_and_donates_its_hyp_state",
                            "test_host_s2_pool_pressure_is_relieved_by_unmapping_mmio",
                            # what came after 6.1: VM stage-2 at EL2, protected VMs, EL2 debug features
                            "test_each_vm_stage2_at_el2_maps_exactly_what_its_guest_touched",
                            "test_a_protected_vm_lifecycle_returns_pools_and_page_states_to_their_baselines",
                            "test_upstream_ownership_selftest_ran_at_el2_init",
                            "test_the_hypervisor_trace_remote_records_a_vm_entering_el2",
                            # EL2 refills a vCPU memcache for a normal VM only since 6.14
                            "test_a_vcpu_memcache_refill_that_fails_reaches_the_host_and_it_goes_on"}, skipped
    assert all(skipped.values())
