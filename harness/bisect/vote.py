"""What one bisect step concluded, and how N runs of it are combined (pure).

Outcomes and their `git bisect run` exit codes:
  GOOD  0    every selected test passed
  BAD   1    a test failed, the model diverged, the kernel or EL2 panicked, or it hung (at boot:
             a pKVM init that deadlocks is a regression, not a machine that cannot judge)
  SKIP  125  the commit cannot be judged: it does not build, or the machinery failed

Vote over --runs N (each run already retried on infrastructure errors):
  BAD  if any run is BAD: an intermittent failure is still the regression showing (flaky
       bugs make false "good" far likelier than false "bad", as syzkaller's bisection assumes);
  GOOD if at least one run is GOOD and none is BAD;
  SKIP if no run could judge the commit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from harness.errors import ExitCode


class StepOutcome(str, Enum):
    GOOD = "good"
    BAD = "bad"
    SKIP = "skip"

    @property
    def git_code(self) -> int:
        return {StepOutcome.GOOD: 0, StepOutcome.BAD: 1, StepOutcome.SKIP: 125}[self]


# pytest's exit codes, as the step's test session reports them.
PYTEST_OK, PYTEST_FAILED, PYTEST_INTERRUPTED, PYTEST_INTERNAL, PYTEST_USAGE, PYTEST_NO_TESTS = range(6)
# The harness's own codes a session ends with (harness.errors.ExitCode: 10-13, clear of pytest's).
# A kernel that panics, or hangs at boot (pKVM init deadlocked), is the regression showing: BAD.
_BAD_CODES = {int(ExitCode.PANIC): "the kernel or EL2 panicked", int(ExitCode.TIMEOUT): "the target hung"}


@dataclass(frozen=True)
class RunResult:
    outcome: StepOutcome
    reason: str                  # one line: the failing test and its message, or why it was skipped
    infra: bool = False          # SKIP because of the machinery (retried), not the commit
    excerpt: str = ""            # console or model lines behind a BAD verdict
    seconds: float = 0.0


@dataclass
class StepVerdict:
    outcome: StepOutcome
    runs: list[RunResult] = field(default_factory=list)

    @property
    def reason(self) -> str:
        deciding = [r for r in self.runs if r.outcome is self.outcome] or self.runs
        return deciding[0].reason if deciding else ""


def classify_pytest(exit_code: int, failure: str = "", panic: str = "") -> RunResult:
    """A step's test session -> outcome. `failure`: the first failing test and its message;
    `panic`: a panic line from the console (a panic is BAD even if pytest reported it as an error)."""
    if panic:
        return RunResult(StepOutcome.BAD, f"panic: {panic}")
    if exit_code == PYTEST_OK:
        return RunResult(StepOutcome.GOOD, "all selected tests passed")
    if exit_code == PYTEST_FAILED:
        return RunResult(StepOutcome.BAD, failure or "a test failed")
    if exit_code in _BAD_CODES:
        return RunResult(StepOutcome.BAD, f"{_BAD_CODES[exit_code]}: {failure}".rstrip(": "))
    if exit_code == ExitCode.BUILD_FAILURE:
        return RunResult(StepOutcome.SKIP, f"the kernel does not build: {failure}".rstrip(": "))
    if exit_code == PYTEST_NO_TESTS:
        return RunResult(StepOutcome.SKIP, "the test expression selected no tests", infra=True)
    return RunResult(StepOutcome.SKIP, f"the test session broke (pytest exit {exit_code}): {failure}".rstrip(": "),
                     infra=True)


def vote(runs: Iterable[RunResult]) -> StepVerdict:
    runs = list(runs)
    outcomes = {r.outcome for r in runs}
    if StepOutcome.BAD in outcomes:
        return StepVerdict(StepOutcome.BAD, runs)
    if StepOutcome.GOOD in outcomes:
        return StepVerdict(StepOutcome.GOOD, runs)
    return StepVerdict(StepOutcome.SKIP, runs)
