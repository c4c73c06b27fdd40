"""A target that dies in the middle of a suite session (a real EL2 BUG on a live pKVM host):
reported once, on the test it died in, with its panic line and console; the later tests are not
run, each saying the target died and why; the session ends with the harness's panic code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness.errors import ExitCode
from harness.report.schema import problems
from tests.integration.conftest import qemu_pids_mentioning

ROOT = Path(__file__).resolve().parents[2]
SUITE = "tests/report/dying_suite/dies_midway.py"
BUG = "nVHE hyp BUG at: arch/arm64/kvm/hyp/nvhe/mem_protect.c"


def test_a_target_that_dies_midway_is_reported_once_with_its_panic_line(kernel, tmp_path):
    run_dir = tmp_path / "suites"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", SUITE,
                        "--pkvm-run-dir", str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == ExitCode.PANIC, out[-4000:]
    for noise in ("BrokenPipeError", "_Stuck", "QMPClient is disconnecting", "Traceback"):
        assert noise not in r.stdout.split("short test summary info")[-1], noise      # no cascade of errors
    result = json.loads((run_dir / "result.json").read_text())
    assert problems(result) == []
    assert result["exit_code"] == ExitCode.PANIC and result["outcome"] == "fail"
    tests = {t["nodeid"].split("::")[-1]: t for t in result["tests"]}
    assert tests["test_before_it_dies"]["outcome"] == "passed"
    died = tests["test_reads_the_hyp_carveout"]
    first_line = died["message"].splitlines()[0]
    assert died["outcome"] == "failed" and first_line.startswith("the target died: el2-bug: ") and BUG in first_line
    assert any(BUG in line for line in died["evidence"]["console"]["lines"])       # the console around it
    for name in ("test_after_it_died", "test_reads_el2_after_it_died"):
        assert tests[name]["outcome"] == "skipped", tests[name]
        assert tests[name]["message"].startswith("not run: the target died in test_reads_the_hyp_carveout: el2-bug")
    assert result["summary"]["failed"] == 1 and result["summary"]["error"] == 0
    assert result["died"].startswith("test_reads_the_hyp_carveout: el2-bug: ") and BUG in result["died"]
    assert out.count(BUG) >= 1
    assert not qemu_pids_mentioning(str(tmp_path))
