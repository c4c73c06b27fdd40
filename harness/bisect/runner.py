"""One real bisect step: build the commit's kernel (incrementally, in the worktree's one O=
directory), then boot it and run the selected suites through the pytest plugin in a child
process, and turn what happened into a verdict."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from harness import REPO_ROOT, verdict
from harness.bisect.vote import RunResult, StepOutcome, classify_pytest
from harness.errors import BuildError, HarnessError, UsageError
from harness.junit import failures
from harness.kernel.build import build
from harness.machine import build_request
from harness.options import BootOptions, KernelOptions, to_argv
from harness.procs import die_with_parent

DEFAULT_SUITES = ("allocator", "stage2")


@dataclass
class SuiteStep:
    cache_dir: Path
    run_dir: Path
    kernel: KernelOptions
    boot: BootOptions
    suites: tuple[str, ...] = DEFAULT_SUITES
    test_expr: str | None = None
    timeout: float = 1800.0
    count: int = 0

    def __call__(self, tree: Path, rev: str) -> RunResult:
        self.count += 1
        step_dir = self.run_dir / f"step-{self.count:02d}-{rev[:12]}"
        step_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        kopts = replace(self.kernel, kernel_src=tree)
        try:
            build(build_request(kopts, self.cache_dir, quiet=True))
        except (BuildError, UsageError) as e:       # this commit cannot be built: it cannot be judged
            return RunResult(StepOutcome.SKIP, f"the kernel does not build: {e.one_line()}",
                             seconds=time.monotonic() - started)
        except HarnessError as e:
            return RunResult(StepOutcome.SKIP, e.one_line(), infra=True, seconds=time.monotonic() - started)
        junit = step_dir / "junit.xml"
        # The plugin's own options, written from the one declaration (harness.options).
        argv = [sys.executable, "-m", "pytest", *[str(REPO_ROOT / "test_suites" / s) for s in self.suites],
                "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", "--pkvm-run-dir", str(step_dir / "run"),
                *to_argv(kopts, self.boot, self.cache_dir)]
        if self.test_expr:
            argv += ["-k", self.test_expr]
        try:
            # The step's pytest (and through it, its QEMU) ends with a SIGKILLed bisect.
            r = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=self.timeout,
                               preexec_fn=die_with_parent())
        except subprocess.TimeoutExpired:
            return RunResult(StepOutcome.SKIP, f"the test session passed its {self.timeout:.0f}s deadline",
                             infra=True, seconds=time.monotonic() - started)
        (step_dir / "pytest.log").write_text(r.stdout + r.stderr)
        failed = failures(junit)[0] if junit.is_file() else []
        first = f"{failed[0].test}: {failed[0].message.strip().splitlines()[0][:300]}" if failed else ""
        panic, excerpt = _panic(step_dir / "run" / "console.log")
        result = classify_pytest(r.returncode, first or _tail(r.stdout), panic)
        if result.outcome is StepOutcome.BAD and not excerpt and failed:
            excerpt = "\n".join(failed[0].message.strip().splitlines()[:30])
        return RunResult(result.outcome, result.reason, result.infra, excerpt, round(time.monotonic() - started, 1))


def _panic(console: Path) -> tuple[str, str]:
    if not console.is_file():
        return "", ""
    found = verdict.panics(console.read_text(errors="replace"))
    return (found[0].line, "\n".join(found[0].excerpt)) if found else ("", "")


def _tail(text: str) -> str:
    """The session's last word: the harness's own reason when it stopped the session (pytest
    frames it as `!!! _pytest.outcomes.Exit: pkvm-harness: ... !!!`), else its last line."""
    lines = text.strip().splitlines()
    for line in reversed(lines):
        if "pkvm-harness: " in line:
            return line[line.index("pkvm-harness: "):].rstrip(" !")[:300]
    return lines[-1][:300] if lines else ""
