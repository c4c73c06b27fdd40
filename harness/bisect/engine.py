"""The bisection loop: ask git for the next commit, judge it (N runs, infrastructure errors
retried), mark it, record it in a state file, until git names the first bad commit.

The state file (bisect.json in the run directory) is rewritten atomically after every step. On
--resume the same `git bisect` is started again and every commit already judged is marked from
the file without running it, so the search continues where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from harness.bisect import git as g
from harness.bisect.vote import RunResult, StepOutcome, StepVerdict, vote
from harness.errors import HarnessError
from harness.fsutil import atomic_write_text


class StepRunner(Protocol):
    def __call__(self, tree: Path, rev: str) -> RunResult: ...


class EndsWrong(HarnessError):
    """--check-ends found the good end bad or the bad end good."""


@dataclass
class Step:
    rev: str
    subject: str
    outcome: str
    reason: str
    seconds: float
    runs: list[dict] = field(default_factory=list)


@dataclass
class Report:
    first_bad: str | None
    subject: str | None
    reason: str                        # why that commit is bad: the failing test or the panic
    excerpt: str
    steps: list[Step]
    candidates: list[str] = field(default_factory=list)    # when only skipped commits remain

    def to_dict(self) -> dict:
        return {"first_bad": self.first_bad, "subject": self.subject, "reason": self.reason,
                "excerpt": self.excerpt, "candidates": self.candidates, "steps": [asdict(s) for s in self.steps]}


class State:
    def __init__(self, path: Path, data: dict) -> None:
        self.path, self.data = path, data

    @classmethod
    def new(cls, path: Path, **params) -> State:
        return cls(path, {"params": params, "steps": [], "ends": {}, "report": None})

    @classmethod
    def load(cls, path: Path) -> State:
        return cls(path, json.loads(path.read_text()))

    @property
    def params(self) -> dict:
        return self.data["params"]

    def judged(self) -> dict[str, Step]:
        return {s["rev"]: Step(**s) for s in self.data["steps"]}

    def add(self, step: Step) -> None:
        self.data["steps"].append(asdict(step))
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")


def judge(runner: StepRunner, tree: Path, rev: str, runs: int, retries: int) -> StepVerdict:
    """`runs` runs of the step; a run that fails on infrastructure is tried again `retries` times."""
    results = []
    for _ in range(runs):
        for attempt in range(retries + 1):
            result = runner(tree, rev)
            if not result.infra or attempt == retries:
                break
        results.append(result)
        if result.outcome is StepOutcome.BAD:
            break                      # the vote is decided: one bad run makes the step bad
    return vote(results)


def run_bisect(repo: Path, tree: Path, runner: StepRunner, state: State, *, runs: int = 1, retries: int = 2,
               check_ends: bool = False, log: Callable[[str], None] = print) -> Report:
    good, bad = state.params["good"], state.params["bad"]
    judged = state.judged()

    def step(rev: str) -> Step:
        if rev in judged:
            log(f"{rev[:12]} {judged[rev].outcome} (from the state file)")
            return judged[rev]
        g.git(tree, "checkout", "--detach", "--force", rev)
        started = time.monotonic()
        verdict = judge(runner, tree, rev, runs, retries)
        s = Step(rev, g.subject(repo, rev), verdict.outcome.value, verdict.reason,
                 round(time.monotonic() - started, 1), [asdict(r) | {"outcome": r.outcome.value} for r in verdict.runs])
        judged[rev] = s
        state.add(s)
        log(f"{rev[:12]} {s.outcome:<4} {s.seconds:6.1f}s  {s.subject[:60]}  ({s.reason[:100]})")
        return s

    if check_ends:
        for rev, want in ((good, StepOutcome.GOOD), (bad, StepOutcome.BAD)):
            got = step(rev)
            if got.outcome != want.value:
                raise EndsWrong(f"--check-ends: {rev[:12]} was given as {want.value} but is {got.outcome}: "
                                f"{got.reason}", hint="check the revisions and the test selection (-k)")
    bisect = g.Bisect(tree, good, bad)
    try:
        for _ in range(4096):
            found, skipped = bisect.first_bad(), bisect.only_skipped()
            if found or skipped:
                break
            rev = bisect.head()
            bisect.mark(step(rev).outcome)
        else:
            raise RuntimeError("git bisect did not converge")
    finally:
        bisect.reset()
    steps = list(judged.values())          # in the order judged: the state file's, then this run's
    if found:
        culprit = judged.get(found)
        report = Report(found, g.subject(repo, found), culprit.reason if culprit else "the bad end itself",
                        _excerpt(culprit), steps)
    else:
        report = Report(None, None, "only skipped commits are left: the first bad commit is one of them", "",
                        steps, skipped or [])
    state.data["report"] = report.to_dict()
    state.save()
    return report


def _excerpt(step: Step | None) -> str:
    if step is None:
        return ""
    bad = [r for r in step.runs if r.get("outcome") == StepOutcome.BAD.value]
    return bad[0].get("excerpt", "") if bad else ""
