"""Reports from a recorded real failing run: the head-insertion mutant (tests/mutants/01-...) under
the allocator suite, recorded in tests/golden/report-mutant01/ (result.json, junit.xml and the
pool pictures). The live counterpart is tests/integration/test_report_live.py."""

from __future__ import annotations

import copy
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.cli import main
from harness.report import render
from harness.report.schema import problems

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "report-mutant01"
FIRST_FAILURE = "test_suites/allocator/test_allocator.py::test_vm_lifecycles_return_every_pool_to_its_baseline[1]"


@pytest.fixture
def result() -> dict:
    return json.loads((GOLDEN / "result.json").read_text())


def test_the_recorded_result_is_valid_and_a_broken_one_is_not(result):
    assert problems(result) == []
    broken = copy.deepcopy(result)
    broken["tests"][1]["outcome"] = "exploded"
    del broken["summary"]["passed"]
    found = problems(broken)
    assert any(p.startswith("tests/1/outcome") for p in found), found
    assert any("passed" in p for p in found), found
    assert problems({**result, "schema_version": 2})


def test_result_and_junit_agree_on_what_failed(result):
    junit = ET.parse(GOLDEN / "junit.xml").getroot()
    failed_junit = {f"{c.get('classname').replace('.', '/')}.py::{c.get('name')}"
                    for c in junit.iter("testcase") if c.find("failure") is not None}
    failed_result = {t["nodeid"] for t in result["tests"] if t["outcome"] == "failed"}
    assert failed_result == failed_junit and len(failed_result) == result["summary"]["failed"] == 4


def test_markdown_shows_the_failure_divergence_diff_occupancy_and_console():
    md = render.markdown([render.load(GOLDEN)])
    assert "## FAIL: suites on QEMU -cpu max (hVHE), Linux 6.12.117" in md
    assert f"### FAILED: `{FIRST_FAILURE}`" in md
    assert "the kernel returned 0x7f908000, the model predicts 0x7f519000" in md
    assert "**First divergent traced operation** (#354 of 355, hpool)" in md
    assert "| host_s2_pool | -1 | 1 | 0 |" in md                   # the EL2 snapshot diff
    assert "| hpool | 1032 | 1008 | 24 | `" in md                  # occupancy, with its bar
    assert "$ /opt/pkvm-harness/bin/pkvm_guest --vms 1 --vcpus 1 --pages 16" in md
    assert md.count("### FAILED") == 4 and "<summary>all 7 tests</summary>" in md
    # the failure message does not repeat the divergence it is about
    first = md.split("### FAILED")[1]
    assert first.count("model  free_area[0] before it: 0x7f519000 0x7f908000") == 1


def test_html_is_one_self_contained_page_with_the_picture_embedded():
    page = render.html([render.load(GOLDEN)])
    assert FIRST_FAILURE.replace("[", "[") in page
    assert page.count('src="data:image/png;base64,') == 4
    assert "<link" not in page and "<script" not in page and "http" not in page.split("</style>")[1].split("<img")[0]


def test_several_runs_give_one_table_of_all(tmp_path):
    second = tmp_path / "nvhe"
    shutil.copytree(GOLDEN, second)
    r = json.loads((second / "result.json").read_text())
    r.update(outcome="pass", exit_code=0, tests=[t for t in r["tests"] if t["outcome"] == "passed"])
    r["target"]["cpu"], r["target"]["pkvm_mode"] = "cortex-a72", "nVHE"
    r["summary"].update(failed=0, total=3)
    (second / "result.json").write_text(json.dumps(r))
    md = render.markdown([render.load(GOLDEN), render.load(second)])
    assert "| suites on QEMU -cpu max (hVHE), Linux 6.12.117 | **FAIL** | 4 failed, 3 passed |" in md
    assert "| suites on QEMU -cpu cortex-a72 (nVHE), Linux 6.12.117 | **PASS** | 3 passed |" in md


def test_report_command_writes_atomically_and_refuses_what_is_not_a_run(tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(GOLDEN), "--format", "html", "-o", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "has no result.json" in capsys.readouterr().err
    (tmp_path / "result.json").write_text('{"schema_version": 1, "command": "suites", ')
    assert main(["report", str(tmp_path)]) == 2
    assert "is not JSON" in capsys.readouterr().err
    (tmp_path / "result.json").write_text('{"schema_version": 7}')
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "schema_version 7" in err and err.count("\n") == 1
    broken = {k: v for k, v in json.loads((GOLDEN / "result.json").read_text()).items() if k != "outcome"}
    (tmp_path / "result.json").write_text(json.dumps(broken))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not match result.schema.json: (top): 'outcome' is a required property" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "result.json"]   # nothing half-written


def test_a_console_excerpt_of_a_death_starts_just_before_its_panic_line():
    from harness.report.evidence import LEAD_LINES, console_excerpt

    lines = [f"line {i}" for i in range(30)] + ["kvm: nVHE hyp BUG at: mem_protect.c:546!"] + \
            [f"trace {i}" for i in range(100)]
    tail = console_excerpt(lines, "console", max_lines=60)
    assert tail["lines"][0] == "trace 40" and tail["omitted"] == 71        # by default: the last lines
    centred = console_excerpt(lines, "console", max_lines=60, focus="nVHE hyp BUG at: mem_protect.c:546!")
    assert centred["lines"][LEAD_LINES] == "kvm: nVHE hyp BUG at: mem_protect.c:546!"
    assert centred["lines"][0] == f"line {30 - LEAD_LINES}" and len(centred["lines"]) == 60
    assert console_excerpt(lines, "console", max_lines=60, focus="not there") == tail
