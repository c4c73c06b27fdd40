"""Reports from real runs: a suite session that fails on purpose on a live pKVM target
(tests/report/failing_suite/), and a `pkvm-harness run`. Their result.json must validate against
the schema, their junit.xml must agree, and the HTML report must load in a real browser and show
the failing test."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.report.schema import problems

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "tests" / "report" / "failing_suite" / "failing_on_purpose.py"
FAILING = "tests/report/failing_suite/failing_on_purpose.py::test_a_trace_missing_one_allocation_diverges"


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("failing") / "suites"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(SUITE.relative_to(ROOT)),
                        "--pkvm-run-dir", str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    return run_dir


def test_a_failing_session_leaves_a_valid_result_with_every_kind_of_evidence(failing_run):
    result = json.loads((failing_run / "result.json").read_text())
    assert problems(result) == []
    assert result["command"] == "suites" and result["outcome"] == "fail" and result["exit_code"] == 1
    assert result["summary"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1, "xfailed": 0, "xpassed": 0,
                                 "total": 3}
    assert result["target"]["kind"] == "qemu" and result["target"]["pkvm_mode"] == "hVHE"
    assert result["kernel"]["version"].startswith("6.12")
    failed = next(t for t in result["tests"] if t["outcome"] == "failed")
    assert failed["nodeid"] == FAILING and failed["message"].startswith("AssertionError: first divergence")
    ev = failed["evidence"]
    assert ev["unavailable"] == {}
    assert ev["divergence"]["reason"] and ev["divergence"]["seq"] >= 0
    assert "$ /opt/pkvm-harness/bin/pkvm_guest --vms 1 --vcpus 1 --pages 8" in ev["console"]["lines"]
    assert "done" in ev["console"]["lines"] and not any("PKH" in line for line in ev["console"]["lines"])
    assert {p["name"] for p in ev["el2_diff"]["pools"]} >= {"hpool", "host_s2_pool"}
    hpool = next(p for p in ev["occupancy"]["pools"] if p["name"] == "hpool")
    assert hpool["free_pages"] + hpool["allocated_pages"] == hpool["nr_pages"] > 0
    assert (failing_run / ev["occupancy"]["picture"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    skipped = next(t for t in result["tests"] if t["outcome"] == "skipped")
    assert skipped["message"] == "shows how a skip reads in the report"


def test_junit_names_the_same_failure(failing_run):
    cases = {c.get("name"): c for c in ET.parse(failing_run / "junit.xml").getroot().iter("testcase")}
    assert set(cases) == {"test_pkvm_is_up", "test_skipped_with_a_reason",
                          "test_a_trace_missing_one_allocation_diverges"}
    assert cases["test_a_trace_missing_one_allocation_diverges"].find("failure") is not None
    assert cases["test_skipped_with_a_reason"].find("skipped") is not None


def test_the_html_report_loads_in_a_browser_and_shows_the_failing_test(failing_run, tmp_path):
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium is not installed (`make setup-test-tools` installs it)")
    page = failing_run / "report.html"
    r = subprocess.run([sys.executable, "-m", "harness", "report", str(failing_run), "--format", "html",
                        "-o", str(page)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    headless = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(headless + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    heading = re.search(r'<h3 [^>]*class="test-name"[^>]*>(.*?)</h3>', dom.stdout, re.S)
    assert heading and FAILING in heading.group(1)
    assert "First divergent traced operation" in dom.stdout and 'src="data:image/png;base64,' in dom.stdout
    shot = failing_run / "report.png"        # kept in the run directory for a person to look at
    subprocess.run(headless + ["--window-size=1200,2000", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_markdown_report_names_the_failure(failing_run):
    r = subprocess.run([sys.executable, "-m", "harness", "report", str(failing_run)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"### FAILED: `{FAILING}`" in r.stdout and "**First divergent traced operation**" in r.stdout


def test_pkvm_harness_run_leaves_a_valid_result_and_junit(tmp_path):
    r = subprocess.run([sys.executable, "-m", "harness", "run", "-q", "--runs-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    result = json.loads((run_dir / "result.json").read_text())
    assert problems(result) == [] and result["outcome"] == "pass"
    suite = ET.parse(run_dir / "junit.xml").getroot().find("testsuite")
    assert suite.get("tests") == "1" and suite.get("failures") == "0"
