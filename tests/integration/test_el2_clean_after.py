"""`el2_clean_after` on a live target (the EL2 suites take it for every test): trouble left by a
passing test fails that test at its teardown, naming what was found; a clean test stays green."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "tests" / "report" / "dirty_suite" / "dirty_on_purpose.py"


def test_trouble_after_a_passing_test_fails_it(tmp_path):
    run_dir = tmp_path / "suites"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(SUITE.relative_to(ROOT)),
                        "--pkvm-run-dir", str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout[-3000:]
    tests = {t["nodeid"].split("::")[-1]: t for t in json.loads((run_dir / "result.json").read_text())["tests"]}
    assert tests["test_a_quiet_test_stays_green"]["outcome"] == "passed"
    warn = tests["test_a_warn_logged_during_the_test_fails_it"]
    assert warn["outcome"] == "error" and warn["phase"] == "teardown"
    assert "mem_protect.c:99 on purpose" in warn["message"]
    dirty = tests["test_an_invariant_broken_after_the_test_fails_it"]
    assert dirty["outcome"] == "error" and "[free-blocks-zero] hpool" in dirty["message"]
