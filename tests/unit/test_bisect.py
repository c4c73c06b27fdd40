"""Bisect on a real (tiny) git history with a fake step runner: outcome mapping, voting, infra
retries, skip of an unbuildable commit, resume after an interruption, bad input."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness.bisect import git as g
from harness.bisect.engine import EndsWrong, State, run_bisect
from harness.bisect.vote import RunResult, StepOutcome, classify_pytest, vote
from harness.errors import ExitCode, UsageError, session_exit_code


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def history(tmp_path):
    """c0 (good) .. c12; c7 brings the bug (it stays); c4 breaks the build and c5 fixes it."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", "t@example.org")
    _git(repo, "config", "user.name", "t")
    revs = []
    for i in range(13):
        (repo / f"file{i}.c").write_text(f"// change {i}\n")
        alloc = repo / "page_alloc.c"
        alloc.write_text("bug\n" if i >= 7 else "ok\n")
        (repo / "Makefile").write_text("broken\n" if i == 4 else "fine\n")
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", f"commit {i}" + (" (the regression)" if i == 7 else ""))
        revs.append(_git(repo, "rev-parse", "HEAD"))
    return repo, revs


class FakeRunner:
    def __init__(self, interrupt_after: int | None = None, flaky_infra: int = 0) -> None:
        self.calls: list[str] = []
        self.interrupt_after = interrupt_after
        self.flaky_infra = flaky_infra

    def __call__(self, tree: Path, rev: str) -> RunResult:
        if self.interrupt_after is not None and len(self.calls) >= self.interrupt_after:
            raise KeyboardInterrupt
        self.calls.append(rev)
        if self.flaky_infra:
            self.flaky_infra -= 1
            return RunResult(StepOutcome.SKIP, "QEMU did not start", infra=True)
        if (tree / "Makefile").read_text() == "broken\n":
            return RunResult(StepOutcome.SKIP, "build failed")
        if (tree / "page_alloc.c").read_text() == "bug\n":
            return RunResult(StepOutcome.BAD, "allocator/test_allocator::test_x: divergence", excerpt="model vs kernel")
        return RunResult(StepOutcome.GOOD, "passed")


def _start(repo: Path, revs: list[str], tmp_path: Path, good: int = 0, bad: int = 12) -> tuple[Path, State]:
    tree = tmp_path / "wt"
    g.prepare_worktree(repo, tree, revs[bad])
    return tree, State.new(tmp_path / "bisect.json", repo=str(repo), good=revs[good], bad=revs[bad])


def test_the_regression_is_named_and_the_users_checkout_is_untouched(history, tmp_path):
    repo, revs = history
    head_before, status_before = _git(repo, "rev-parse", "HEAD"), _git(repo, "status", "--porcelain")
    tree, state = _start(repo, revs, tmp_path)
    report = run_bisect(repo, tree, FakeRunner(), state, log=lambda _: None)
    assert report.first_bad == revs[7] and report.subject == "commit 7 (the regression)"
    assert "divergence" in report.reason and report.excerpt == "model vs kernel"
    assert (_git(repo, "rev-parse", "HEAD"), _git(repo, "status", "--porcelain")) == (head_before, status_before)
    assert "refs/bisect" not in _git(repo, "for-each-ref")          # the user's bisect state is untouched
    assert State.load(tmp_path / "bisect.json").data["report"]["first_bad"] == revs[7]


def test_an_unbuildable_commit_is_skipped(history, tmp_path):
    repo, revs = history
    tree, state = _start(repo, revs, tmp_path, good=3, bad=8)     # 4 (broken), 5, 6 good, 7 bad
    report = run_bisect(repo, tree, FakeRunner(), state, log=lambda _: None)
    assert report.first_bad == revs[7]
    outcomes = {s.rev: s.outcome for s in report.steps}
    assert outcomes.get(revs[4], "skip") == "skip"


def test_resume_after_an_interruption_runs_no_step_twice(history, tmp_path):
    repo, revs = history
    tree, state = _start(repo, revs, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_bisect(repo, tree, FakeRunner(interrupt_after=2), state, log=lambda _: None)
    saved = State.load(tmp_path / "bisect.json")
    assert len(saved.data["steps"]) == 2
    again = FakeRunner()
    report = run_bisect(repo, tree, again, saved, log=lambda _: None)
    assert report.first_bad == revs[7]
    assert not set(again.calls) & {s["rev"] for s in saved.data["steps"][:2]}
    assert len(report.steps) == 2 + len(again.calls)


def test_infrastructure_errors_are_retried_and_check_ends_confirms_both_ends(history, tmp_path):
    repo, revs = history
    tree, state = _start(repo, revs, tmp_path)
    runner = FakeRunner(flaky_infra=2)
    report = run_bisect(repo, tree, runner, state, check_ends=True, log=lambda _: None)
    assert report.first_bad == revs[7] and runner.calls[:3] == [revs[0]] * 3      # two retries, then good
    tree2, state2 = _start(repo, revs, tmp_path / "x", good=8, bad=12)
    with pytest.raises(EndsWrong, match="was given as good but is bad"):
        run_bisect(repo, tree2, FakeRunner(), state2, check_ends=True, log=lambda _: None)


def test_a_good_rev_that_is_not_an_ancestor_of_bad_is_refused(history):
    repo, revs = history
    with pytest.raises(UsageError, match="not an ancestor"):
        g.check_range(repo, revs[9], revs[2])
    with pytest.raises(UsageError, match="not a commit"):
        g.resolve(repo, "no-such-rev")


def test_outcomes_map_to_git_bisect_run_codes_and_the_vote_is_bad_if_any_run_is_bad():
    assert [o.git_code for o in (StepOutcome.GOOD, StepOutcome.BAD, StepOutcome.SKIP)] == [0, 1, 125]
    good, bad = RunResult(StepOutcome.GOOD, "ok"), RunResult(StepOutcome.BAD, "failed")
    skip = RunResult(StepOutcome.SKIP, "infra", infra=True)
    assert vote([good, bad, good]).outcome is StepOutcome.BAD
    assert vote([good, skip]).outcome is StepOutcome.GOOD and vote([skip, skip]).outcome is StepOutcome.SKIP
    assert classify_pytest(0).outcome is StepOutcome.GOOD and classify_pytest(1, "t: x").outcome is StepOutcome.BAD
    assert classify_pytest(0, panic="nVHE hyp panic at").outcome is StepOutcome.BAD
    assert classify_pytest(3).infra and classify_pytest(5).outcome is StepOutcome.SKIP


@pytest.mark.parametrize("code, outcome, infra", [
    (ExitCode.PANIC, StepOutcome.BAD, False),        # the kernel or EL2 panicked: the regression showing
    (ExitCode.TIMEOUT, StepOutcome.BAD, False),      # it hung at boot (pKVM init deadlocked): a regression too
    (ExitCode.BUILD_FAILURE, StepOutcome.SKIP, False),
    (ExitCode.INFRA, StepOutcome.SKIP, True),        # the machine failed, not the commit: retried
    (4, StepOutcome.SKIP, True),                     # pytest's usage error (a bad --pkvm- option)
    (2, StepOutcome.SKIP, True),                     # pytest interrupted
])
def test_a_session_that_ends_on_a_harness_code_is_judged_by_it(code, outcome, infra):
    r = classify_pytest(int(code), "target not usable: the pKVM host did not come up")
    assert r.outcome is outcome and r.infra is infra, r


def test_the_harness_codes_do_not_collide_with_pytests():
    assert {int(c) for c in ExitCode} & set(range(2, 6)) == {int(ExitCode.USAGE)}    # 2, as argparse
    assert session_exit_code(ExitCode.USAGE) == 4 and session_exit_code(ExitCode.PANIC) == ExitCode.PANIC


def test_a_stopped_sessions_reason_is_the_harnesss_own_line():
    from harness.bisect.runner import _tail

    out = ("collected 3 items\n\n!!!!! _pytest.outcomes.Exit: pkvm-harness: target not usable: the pKVM host did "
           "not come up: timed out before the ready marker; last console line: [0.3] Freeing initrd !!!!!\n"
           "no tests ran in 61.2s\n")
    assert _tail(out) == ("pkvm-harness: target not usable: the pKVM host did not come up: timed out before the "
                          "ready marker; last console line: [0.3] Freeing initrd")
    assert _tail("1 failed in 3s\n") == "1 failed in 3s" and _tail("") == ""
