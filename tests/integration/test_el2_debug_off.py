"""--el2-debug off: the kernel as it ships, without NVHE_EL2_DEBUG (and what hangs off it: the
EL2 stack trace, and on 7.x the ownership selftest and the hypervisor's trace remote). Built
beside the debug kernel under its own cache key; the boot suite's EL2-debug checks confirm the
absence and skip, every other boot check holds. One more cold build: `make test-slow`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.kernel.build import build, lookup
from harness.machine import build_request
from harness.options import KernelOptions

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_7_3_without_el2_debug_builds_apart_boots_and_lacks_the_debug_features(cache_dir, tmp_path):
    debug = build_request(KernelOptions(kernel="7.3"), cache_dir, quiet=True)
    shipped = build_request(KernelOptions(kernel="7.3", el2_debug="off"), cache_dir, quiet=True)
    assert shipped.requested["NVHE_EL2_DEBUG"].value == "n" and "PKVM_STACKTRACE" not in shipped.requested
    kernel = build(shipped)
    config = kernel.config.read_text()
    assert "# CONFIG_NVHE_EL2_DEBUG is not set" in config and "CONFIG_NVHE_EL2_TRACING" not in config
    assert kernel.key == lookup(shipped)[0] != lookup(debug)[0]          # two kernels, two cache entries
    run_dir = tmp_path / "suites"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_suites/boot",
                        "--pkvm-kernel", "7.3", "--pkvm-el2-debug", "off", "--pkvm-run-dir", str(run_dir)],
                       cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    outcomes = {t["nodeid"].split("::")[1]: t for t in json.loads((run_dir / "result.json").read_text())["tests"]}
    for name in ("test_upstream_ownership_selftest_ran_at_el2_init",
                 "test_the_hypervisor_trace_remote_records_a_vm_entering_el2"):
        assert outcomes[name]["outcome"] == "skipped" and "--el2-debug off" in outcomes[name]["message"], name
    assert {t["outcome"] for n, t in outcomes.items() if "el2" not in n} == {"passed"}
