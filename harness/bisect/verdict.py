"""What one bisect step concluded, and how N runs of it are combined (pure).

Outcomes and their `git bisect run` exit codes:
  GOOD  0    every selected test passed
  BAD   1    a test failed, the model diverged, or the kernel or EL2 panicked
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


class Outcome(str, Enum):
    GOOD = "good"
    BAD = "bad"
    SKIP = "skip"

    @property
    def git_code(self) -> int:
        return {Outcome.GOOD: 0, Outcome.BAD: 1, Outcome.SKIP: 125}[self]


# pytest's exit codes, as the step's test session reports them.
PYTEST_OK, PYTEST_FAILED, PYTEST_INTERRUPTED, PYTEST_INTERNAL, PYTEST_USAGE, PYTEST_NO_TESTS = range(6)


@dataclass(frozen=True)
class RunResult:
    outcome: Outcome
    reason: str                  # one line: the failing test and its message, or why it was skipped
    infra: bool = False          # SKIP because of the machinery (retried), not the commit
    excerpt: str = ""            # console or model lines behind a BAD verdict
    seconds: float = 0.0


@dataclass
class StepVerdict:
    outcome: Outcome
    runs: list[RunResult] = field(default_factory=list)

    @property
    def reason(self) -> str:
        deciding = [r for r in self.runs if r.outcome is self.outcome] or self.runs
        return deciding[0].reason if deciding else ""


def classify_pytest(exit_code: int, failure: str = "", panic: str = "") -> RunResult:
    """A step's test session -> outcome. `failure`: the first failing test and its message;
    `panic`: a panic line from the console (a panic is BAD even if pytest reported it as an error)."""
    if panic:
        return RunResult(Outcome.BAD, f"panic: {panic}")
    if exit_code == PYTEST_OK:
        return RunResult(Outcome.GOOD, "all selected tests passed")
    if exit_code == PYTEST_FAILED:
        return RunResult(Outcome.BAD, failure or "a test failed")
    if exit_code == PYTEST_NO_TESTS:
        return RunResult(Outcome.SKIP, "the test expression selected no tests", infra=True)
    return RunResult(Outcome.SKIP, f"the test session broke (pytest exit {exit_code}): {failure}".rstrip(": "),
                     infra=True)


def vote(runs: Iterable[RunResult]) -> StepVerdict:
    runs = list(runs)
    outcomes = {r.outcome for r in runs}
    if Outcome.BAD in outcomes:
        return StepVerdict(Outcome.BAD, runs)
    if Outcome.GOOD in outcomes:
        return StepVerdict(Outcome.GOOD, runs)
    return StepVerdict(Outcome.SKIP, runs)
