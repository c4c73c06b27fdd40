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
