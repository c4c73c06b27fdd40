"""The error paths on every kernel the harness builds (make test-slow): a full fault sweep of a
1-vCPU lifecycle and a sweep of the randomized workload's first calls, each through the CLI, where
every run must end handled or as the kernel's own code explains (harness.model.error_paths); and
the hostile-host suite on each kernel's hostile-host test build."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.junit import failures
from tests.integration.conftest import run_cli

REPO = Path(__file__).resolve().parents[2]
KERNELS = ["6.12", "6.1", "7.3"]


def _sweep(tmp_path: Path, kernel: str, *args: str) -> dict:
    r = run_cli("inject", "--sweep", "--kernel", kernel, "--el2-plugin", "off", "-q", "--runs-dir", str(tmp_path),
                *args, timeout=3600)
    run_dir = Path(next(ln for ln in r.stdout.splitlines() if ln.startswith("run dir: ")).split()[2])
    data = json.loads((run_dir / "inject.json").read_text())
    print(r.stdout)
    assert r.returncode == 0, f"unexplained findings on stock {kernel}:\n{r.stdout[-6000:]}"
    return data


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_allocation_of_a_lifecycle_fails_as_the_kernel_explains(kernel, tmp_path):
    data = _sweep(tmp_path, kernel)
    assert data["runs"] == len(data["counted"]["calls"]) > 0
    assert data["findings"] == 0
    assert all(r["verdict"] == "handled" or r["explained"] for r in data["rows"]), data["rows"]
    assert any(r["failed"] for r in data["rows"]), "no planned failure fired"


@pytest.mark.slow
def test_the_random_workloads_first_allocations_fail_as_the_kernel_explains(tmp_path):
    data = _sweep(tmp_path, "6.12", "--workload", "random", "--seed", "1", "--limit", "30")
    assert data["runs"] == 30 and data["findings"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("kernel", KERNELS)
def test_the_hostile_host_suite_passes_on_each_kernels_test_build(kernel, tmp_path):
    junit = tmp_path / "junit.xml"
    argv = [sys.executable, "-m", "pytest", str(REPO / "test_suites" / "hostile"), "-q", "-p", "no:cacheprovider",
            f"--junitxml={junit}", "--pkvm-run-dir", str(tmp_path / "run"), "--pkvm-kernel", kernel,
            "--pkvm-config", "pkvm-hostile-host", "--pkvm-seed", "1", "-rs"]
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=3600)
    failed, total = failures(junit)
    assert r.returncode == 0 and failed == [], r.stdout[-4000:]
    assert "no hostile-host interface" not in r.stdout, "the test kernel had no hostile-host interface"
    assert total >= 7, r.stdout[-2000:]


FIX_6_1 = REPO / "tests" / "fixes" / "6.1-host-share-of-non-memory.patch"


@pytest.mark.slow
@pytest.mark.parametrize("fixed", [False, True], ids=["stock", "fixed"])
def test_6_1_shares_a_pfn_past_memory_for_good_unless_fixed(cache_dir, tmp_path, fixed):
    """The kernel bug the hostile host found on 6.1.192 (KernelVersion.host_state_checks_memory),
    reproduced on the stock kernel, and gone with tests/fixes/6.1-host-share-of-non-memory.patch."""
    from harness.el2.snapshot import El2Reader
    from harness.model.errnos import EINVAL, EPERM
    from harness.options import KernelOptions
    from harness.targets.hostile import HostileHost
    from tests.integration.conftest import assembled

    kopts = KernelOptions(kernel="6.1", fragments=["pkvm-hostile-host"], patches=[FIX_6_1] if fixed else [])
    machine = assembled(cache_dir, tmp_path, kopts)
    with machine.start(tmp_path) as target, El2Reader(target.qmp_socket, target.vmlinux, cache_dir) as reader:
        host = HostileHost(target, reader.kernel.hypercalls)
        past = max(base + size for base, size, _ in reader.snapshot().memblocks) + (1 << 30)
        share = host.call("__pkvm_host_share_hyp", past >> 12).ret
        unshare = host.call("__pkvm_host_unshare_hyp", past >> 12).ret
    if fixed:
        assert (share, unshare) == (EPERM, EPERM)
    else:
        assert (share, unshare) == (0, EINVAL), \
            f"6.1.192's bug no longer reproduces (share {share}, unshare {unshare}): update host_state_checks_memory"
