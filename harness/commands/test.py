"""`pkvm-harness test`: the kernel developer's loop, as `kunit.py run` is for KUnit. Build (or use
--kernel-build), boot once, run the suites through the pytest plugin, and end with a summary:
the counts, each failure's first line, and where the run directory and its report are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness import REPO_ROOT, rundir
from harness.errors import UsageError
from harness.machine import MachineRequest
from harness.options import BootOptions, KernelOptions, to_argv

SUITES_DIR = REPO_ROOT / "test_suites"


def available_suites() -> list[str]:
    return sorted(p.name for p in SUITES_DIR.iterdir() if p.is_dir() and any(p.glob("test_*.py")))


def test(kopts: KernelOptions, bopts: BootOptions, cache_dir: Path, runs_dir: Path, suites: list[str],
         test_expr: str | None = None, quiet: bool = False, verbose: bool = False) -> int:
    unknown = sorted(set(suites) - set(available_suites()))
    if unknown:
        raise UsageError(f"no suite {', '.join(unknown)} in test_suites/",
                         hint=f"choose from {', '.join(available_suites())}")
    request = MachineRequest.check(kopts, bopts, cache_dir, quiet=quiet)
    request.kernel()                  # built here, in the open, so a cold build shows its progress
    run_dir = rundir.create(runs_dir)
    # The harness is imported already (this process), so pytest cannot rewrite its asserts: expected.
    argv = [*(str(SUITES_DIR / s) for s in suites), "-p", "no:cacheprovider", "-v" if verbose else "-q",
            "-W", "ignore::pytest.PytestAssertRewriteWarning",
            "--pkvm-run-dir", str(run_dir), *to_argv(kopts, bopts, cache_dir)]
    if test_expr:
        argv += ["-k", test_expr]
    import pytest  # only this command needs it

    code = int(pytest.main(argv))
    print(summary(run_dir, code))
    return code


def summary(run_dir: Path, code: int) -> str:
    """The end of a `test` run: what ran, what failed (one line each), and where to look."""
    path = run_dir / "result.json"
    if not path.is_file():
        return f"pkvm-harness test: no result.json in {run_dir} (pytest exit {code})"
    r: dict[str, Any] = json.loads(path.read_text())
    s, target, kernel = r["summary"], r.get("target", {}), r.get("kernel") or {}
    lines = [f"{'=' * 20} pkvm-harness test summary {'=' * 20}"]
    if kernel:
        lines.append(f"kernel:  Linux {kernel['version']} ({kernel.get('origin') or kernel['source']})")
    lines.append(f"target:  {target.get('name', '?')}" + (f" -cpu {target['cpu']}, pKVM {target.get('pkvm_mode')}"
                                                          if target.get("cpu") else ""))
    lines.append(f"tests:   {s['total']} ran: {s['passed']} passed, {s['failed']} failed, {s['error']} errors, "
                 f"{s['skipped']} skipped in {r['duration_s']:.0f}s")
    if r.get("reason"):
        lines.append(f"stopped: {r['reason']}")
    if r.get("died"):
        lines.append(f"died:    {r['died']}")
    for t in r["tests"]:
        if t["outcome"] in ("failed", "error"):
            first = (t.get("message") or "").strip().splitlines()[:1]
            lines.append(f"{t['outcome'].upper():<7}  {t['nodeid']}: {first[0][:160] if first else ''}")
    lines.append(f"result:  {r['outcome'].upper()} (exit {code})")
    lines.append(f"run dir: {run_dir}  (report: pkvm-harness report {run_dir} --format html -o report.html)")
    return "\n".join(lines)
