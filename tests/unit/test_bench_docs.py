"""bench/run.py's report: the docs writer puts one table between its markers and draws the
scaling plot; an unknown section is refused with exit 2 before anything is measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from docs_writer import BEGIN, END, write_docs  # noqa: E402

FIGURES = {
    "machine": {"date": "2026-11-21 18:00 UTC", "cpu": "Test CPU", "cores": 2, "memory_gib": 24.0,
                "os": "Debian GNU/Linux 12", "qemu": "QEMU emulator version 7.2.x", "python": "3.11"},
    "kernel": "6.12.117", "total_s": 100.0,
    "figures": [{"section": "boot", "name": "harness / bare QEMU boot", "unit": "x", "target": "<= 1.1",
                 "note": "", "median": 1.04, "min": 1.01, "max": 1.09, "n": 5, "ratio_of_medians": 1.03}],
    "scaling": {"memory_mib": [512, 1024], "snapshot_ms": [{"median": 40.0}, {"median": 70.0}],
                "replay_ms_per_op": [{"median": 0.02}, {"median": 0.02}], "model_ops": [1000, 10000],
                "model_replay_s": [{"median": 0.002}, {"median": 0.02}]},
}


def test_the_table_lands_between_the_markers_and_the_plot_is_drawn(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# B\n\nintro\n\n{BEGIN}\nold\n{END}\n\ntail\n")
    written = write_docs(FIGURES, tmp_path)
    text = doc.read_text()
    assert text.startswith("# B\n\nintro\n\n") and text.endswith("\n\ntail\n") and "old" not in text
    assert "| boot | harness / bare QEMU boot | 1.04 (ratio of medians 1.03) | 1.01 | 1.09 | 5 | x | <= 1.1 |" in text
    assert "Test CPU, 2 cores, 24.0 GiB" in text
    assert json.loads(written[1].read_text())["kernel"] == "6.12.117"
    assert written[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_real_docs_have_the_markers():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    assert BEGIN in text and END in text


def test_an_unknown_section_is_refused_before_measuring():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--only", "boot,warp"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown section(s) warp" in r.stderr and r.stdout == ""


def test_a_partial_run_replaces_only_its_sections_and_keeps_the_full_runs_header(tmp_path):
    from run import merged

    path = tmp_path / "run.json"
    path.write_text(json.dumps({**FIGURES, "figures": [
        {"section": "boot", "name": "b", "median": 1}, {"section": "bisect", "name": "old", "median": 90}]}))
    new = {"machine": {**FIGURES["machine"], "date": "later"}, "kernel": "6.12.117", "total_s": 5.0,
           "figures": [{"section": "bisect", "name": "new", "median": 44, "measured_at": "later"}]}
    out = merged(path, ["bisect"], new)
    assert [(r["name"], r["measured_at"]) for r in out["figures"]] == [("b", FIGURES["machine"]["date"]),
                                                                        ("new", "later")]
    assert out["machine"]["date"] == FIGURES["machine"]["date"] and out["total_s"] == 100.0
    assert out["partial_runs"] == [{"sections": ["bisect"], "date": "later", "total_s": 5.0}]
