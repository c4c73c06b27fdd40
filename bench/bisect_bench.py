#!/usr/bin/env python3
"""Bisect benchmark: prints figures, asserts nothing.

Runs `pkvm-harness bisect` on the nine-commit kernel history of tests/integration/kernel_history.py
(an allocator regression, a commit that does not build) and reports the time of each step, the
median (target: <= 90 s for allocator-only changes on 2 cores) and the total. The first run
includes the worktree's cold build in its first step.

Usage: python bench/bisect_bench.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import print_table, stats, write_json  # noqa: E402  (also puts the repo on sys.path)

from harness.paths import default_cache_dir  # noqa: E402
from tests.integration.kernel_history import kernel_history  # noqa: E402


def run_bisect(cache: Path, fresh_kernels: bool = True) -> dict:
    """One whole bisect of the history, its ends checked first (six steps in all); its report.json.
    `fresh_kernels`: a config no earlier run
    used (CONFIG_LOCALVERSION), so every step builds (incrementally, in the worktree's O=
    directory) instead of finding its kernel in the cache."""
    repo, revs = kernel_history(cache)
    extra = ["--kconfig", f'CONFIG_LOCALVERSION="-bench{time.strftime("%H%M%S")}"'] if fresh_kernels else []
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "harness", "bisect", "--repo", str(repo), "--good", revs["base"],
                            "--bad", revs["doc5"], "--suites", "allocator", "-k", "lifecycles", "--runs-dir", tmp,
                            "--check-ends", *extra], capture_output=True, text=True, timeout=7200)
        if r.returncode != 0:
            raise RuntimeError(f"bisect exited {r.returncode}: {r.stdout[-2000:]}{r.stderr[-1000:]}")
        run_dir = next(p for p in Path(tmp).iterdir() if p.is_dir() and not p.is_symlink())
        return json.loads((run_dir / "report.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "bisect.json")
    ap.add_argument("--cached-kernels", action="store_true", help="let steps reuse kernels built by earlier runs")
    a = ap.parse_args()
    report = run_bisect(default_cache_dir(), fresh_kernels=not a.cached_kernels)
    seconds = [s["seconds"] for s in report["steps"]]
    total = stats([sum(seconds)], 1)
    print_table([("bisect step (s)", stats(seconds, 1), "<= 90"), ("bisect total (s)", total, ""),
                 ("steps", stats([float(len(seconds))], 0), "")])
    write_json(a.json, {"step_s": stats(seconds, 1), "total_s": sum(seconds), "first_bad": report["first_bad"],
                        "steps": report["steps"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
