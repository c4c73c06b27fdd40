"""The pytest side of reports: every suite run leaves junit.xml and result.json in its run directory.

Registered by harness.pytest_plugin. A session that used the `target` fixture is a suite run: at
its end, result.json (schema: harness/report/result.schema.json) and junit.xml are written into
the run directory. For each failing test on a live target, `watch()` gathers evidence: the console
while the test ran, an EL2 snapshot before and after (their diff and a pool picture) and the
first divergence of any trace replayed in the test.
"""

from __future__ import annotations

import re
import time
import types
from pathlib import Path
from typing import Any

import pytest

from harness import rundir
from harness.errors import ExitCode
from harness.report import evidence
from harness.report.result import KernelSummary, Result
from harness.targets.base import ConsoleLog, Target
from harness.targets.framing import readable
from harness.verdict import panics

PLUGIN_NAME = "pkvm-suite-recorder"
REPLAYS = pytest.StashKey[list]()          # item -> ReplayResult holders (objects with .result)
PHASE_FAILED = pytest.StashKey[bool]()     # item -> its setup or call failed (later checks stay quiet)
WATCH = pytest.StashKey["EvidenceWatch"]()
MESSAGE_LINES = 40


def _message(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(report.longrepr, "reprcrash", None)
    text = str(crash.message) if crash is not None else report.longreprtext.strip()
    lines: list[str] = []
    for line in text.splitlines():            # the assertion's own message, not pytest's re-evaluation
        if lines and re.match(r"\s*(assert |\+\s+where )", line):
            break
        lines.append(line)
    return "\n".join(lines[:MESSAGE_LINES])


def _slug(nodeid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid.split("/")[-1])[:120]


class SuiteRecorder:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.started = time.time()
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.run_dir: Path | None = None
        self.target: Target | None = None
        self.kernel: Any = None                   # harness.kernel.build.KernelArtifacts, on QEMU
        self.tests: dict[str, dict[str, Any]] = {}
        self.exitstatus: int | None = None
        self.reason: str | None = None           # why the session stopped early, when it did
        self.died: str | None = None             # "<test>: <why>" once the target died
        self.panic_line: str | None = None       # the console's first panic line, when that is why
        self.live: Any = None                    # harness.replay.LiveReplay, when the target runs el2trace
        self.el2_summary: dict[str, Any] = {}    # the live replay's totals, in result.json
        self.after_checks = (0, 0.0)              # el2_clean_after: tests judged, seconds spent
        self._live_counts = (0, 0)               # (allocator calls, hypercalls) at the last judgement

    def attach(self, run_dir: Path) -> None:
        """The session is about to boot or connect a target: a suite run, reported in run_dir."""
        self.run_dir = run_dir

    # --- each test -----------------------------------------------------------------------

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        # A target dies once: the test it died in failed with its panic line; later ones do not run.
        if self.died is not None and isinstance(item, pytest.Function) and "target" in item.fixturenames:
            pytest.skip(f"not run: the target died in {self.died}")

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Any:
        """For a test on a live target: watch it, so a failure comes with its evidence."""
        funcargs = item.funcargs if isinstance(item, pytest.Function) else {}
        target = funcargs.get("target")
        if isinstance(target, Target) and self.run_dir is not None:
            item.stash[WATCH] = EvidenceWatch(target, funcargs.get("el2"), evidence_dir(self.run_dir, item.nodeid))
            item.stash[REPLAYS] = item.stash.get(REPLAYS, [])
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        report = yield
        if self.live is not None and not hasattr(report, "context"):
            self._judge_el2_calls(item, report)
        if report.failed and report.when in ("setup", "call"):
            item.stash[PHASE_FAILED] = True
        if call.when == "call" and not hasattr(report, "context") and report.failed and self.target is not None:
            death = self.target.death()
            if death is not None and self.died is None:
                self.died = f"{item.nodeid.split('::')[-1]}: {death}"
                if isinstance(self.target, ConsoleLog):
                    found = panics(self.target.console_text())
                    self.panic_line = found[0].line if found else None
                report.sections.append(("pkvm-harness", f"the target died during this test: {death}"))
                report.pkvm_death = death
            watch = item.stash.get(WATCH, None)
            if watch is not None:
                self.add_evidence(item.nodeid, watch.collect(item.stash.get(REPLAYS, []), alive=death is None,
                                                             panic_line=self.panic_line))
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        rec = self.tests.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": "passed",
                                                    "duration_s": 0.0})
        context = getattr(report, "context", None)
        if context is not None:                  # a subtest (KTAP line): listed under its test
            if report.when == "call":
                rec.setdefault("subtests", []).append(
                    {"name": context.msg or ", ".join(f"{k}={v}" for k, v in context.kwargs.items()),
                     "outcome": report.outcome, **({"message": _message(report)} if not report.passed else {})})
            return
        rec["duration_s"] = round(rec["duration_s"] + report.duration, 3)
        for key, value in report.user_properties:
            rec.setdefault("properties", {})[key] = value
        if hasattr(report, "wasxfail"):
            rec["outcome"] = "xfailed" if report.skipped else "xpassed"
        elif report.failed:
            rec["outcome"] = "failed" if report.when == "call" else "error"
            death = getattr(report, "pkvm_death", None)
            rec.setdefault("message", (f"the target died: {death}\n" if death else "") + _message(report))
            rec.setdefault("phase", report.when)
        elif report.skipped and rec["outcome"] == "passed":
            rec["outcome"] = "skipped"
            rec["message"] = _message(report)

    def _judge_el2_calls(self, item: pytest.Item, report: pytest.TestReport) -> None:
        """The EL2 allocator calls made during this phase of the test, replayed in the model: a
        divergence fails the test (its setup or teardown: an error), once, with the model's report."""
        before = self._live_counts
        self.live.poll()
        self._live_counts = (self.live.ops_total, self.live.host_calls_total)
        if self._live_counts != before:
            report.user_properties.append((f"el2_calls_{report.when}",
                                           {"allocator": self._live_counts[0] - before[0],
                                            "hypercalls": self._live_counts[1] - before[1]}))
        divergence = self.live.take_divergence()
        if divergence is None:
            return
        text = f"EL2 allocator replay diverged during this test's {report.when}:\n{divergence.render()}"
        item.stash.setdefault(REPLAYS, []).append(types.SimpleNamespace(result=self.live.replayer.result()))
        if report.passed:
            report.outcome = "failed"
            report.longrepr = text
        else:
            report.sections.append(("pkvm-harness el2 replay", text))

    def close_live(self) -> None:
        """The target has stopped: the plugin's last records (block counts) are read, and the
        session's totals kept for result.json."""
        if self.live is None:
            return
        self.live.poll()
        cov = self.live.calls.coverage
        checker = self.live.transitions
        self.el2_summary = {"allocator_calls": self.live.ops_total, "hypercalls": self.live.host_calls_total,
                            "transitions": {"calls": checker.count, "by_function": checker.by_name,
                                            "vm_teardowns_settled": checker.settled},
                            "after_test_checks": {"tests": self.after_checks[0],
                                                  "seconds": round(self.after_checks[1], 2)},
                            "replay_divergence": self.live.replayer.divergence is not None,
                            "hyp_blocks_executed": len(cov.blocks), "probe_hits_not_at_el2": cov.probe_hits_not_at_el2,
                            "read_failures": cov.read_failures}
        try:
            self._el2_coverage()
        finally:                                  # the whole trace stays, 10x smaller
            from harness.el2.tcg.stream import compress

            if self.live.stream.is_file():
                compress(self.live.stream)

    def _el2_coverage(self) -> None:
        if self.config.getoption("--pkvm-el2-coverage") and self.run_dir is not None:
            from harness.errors import HarnessError
            from harness.report.run_coverage import el2_coverage

            try:
                outcome = el2_coverage(self.run_dir, blocks=self.live.calls.coverage.blocks)
            except HarnessError as e:          # a QEMU that did not exit cleanly wrote no counts
                self.el2_summary["coverage"] = {"error": e.one_line()}
                return
            self.el2_summary["coverage"] = {
                "files": {s.file: {"lines": [s.lines_hit, s.lines_found], "functions": [s.functions_hit,
                                                                                        s.functions_found]}
                          for s in outcome.key_files()},
                "never_run": [f.name for f in outcome.never_run], "html": str(outcome.index)}

    def add_evidence(self, nodeid: str, found: dict[str, Any]) -> None:
        self.tests.setdefault(nodeid, {"nodeid": nodeid, "outcome": "failed", "duration_s": 0.0})["evidence"] = found

    # --- the end ---------------------------------------------------------------------------

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.exitstatus = int(exitstatus)
        # A session whose target panicked ends with the harness's panic code, not a test failure's 1.
        if self.panic_line is not None and self.exitstatus == ExitCode.TEST_FAILURE:
            session.exitstatus = self.exitstatus = int(ExitCode.PANIC)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.run_dir is None:
            return
        result = self.result()
        rundir.write_result(self.run_dir, result)
        rundir.write_suite_junit(self.run_dir, result)

    def result(self) -> dict[str, Any]:
        tests = list(self.tests.values())
        for t in tests:          # a test whose subtests failed has failed, whatever its own call said
            bad = [s for s in t.get("subtests", []) if s["outcome"] == "failed"]
            if bad and t["outcome"] == "passed":
                t.update(outcome="failed", message=f"{len(bad)} subtest(s) failed: {bad[0]['name']}")
        counts = {k: 0 for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
        for t in tests:
            counts[t["outcome"]] += 1
        status = self.exitstatus if self.exitstatus is not None else int(ExitCode.INFRA)
        assert self.run_dir is not None
        outcome = {0: "pass", 1: "fail", 2: "interrupted", int(ExitCode.PANIC): "fail"}.get(status, "error")
        result = Result("suites", str(self.run_dir.resolve()), self.started_at, self.started, outcome=outcome,
                        reason=self.reason or "",
                        kernel=KernelSummary.of(self.kernel) if self.kernel is not None else None)
        result.fields.update(
            args=[str(a) for a in self.config.invocation_params.args],
            target=self.target.describe().to_dict() if self.target is not None
            else {"kind": "none", "name": "no target (it did not come up)"},
            summary={**counts, "total": len(tests)}, junit="junit.xml", tests=tests,
            **({"died": self.died} if self.died else {}),
            **({"el2trace": self.el2_summary} if self.el2_summary else {}))
        result.finish(status)
        return result.to_dict()


class EvidenceWatch:
    """Watches one test on a live target; `collect()` after a failure returns its evidence."""

    def __init__(self, target: Target, el2: Any, evidence_dir: Path) -> None:
        self.target, self.el2, self.evidence_dir = target, el2, evidence_dir
        self.unavailable: dict[str, str] = {}
        self.console_from = len(target.console_text()) if isinstance(target, ConsoleLog) else None
        self.commands_from = len(target.commands)
        self.before = self._snapshot("el2_diff")

    def _snapshot(self, part: str):
        if self.el2 is None:
            self.unavailable[part] = "the test does not read EL2 (no el2 fixture)"
            return None
        try:
            return self.el2.snapshot()
        except Exception as e:      # a dead or wedged target: say so in the report, do not fail again
            self.unavailable[part] = f"snapshot failed: {type(e).__name__}: {e}"
            return None

    def collect(self, replays: list[Any], alive: bool = True, panic_line: str | None = None) -> dict[str, Any]:
        """The evidence of a failed test; a target that died is shown from just before `panic_line`."""
        found: dict[str, Any] = {}
        found["console"] = self._console(None if alive else panic_line)
        if not alive:                    # its memory is gone with it: the console says what happened
            self.el2 = None
            self.unavailable["el2_diff"] = "the target died during the test"
        for holder in replays:
            div = evidence.divergence(getattr(holder, "result", None))
            if div is not None:
                found["divergence"] = div
                break
        after = self._snapshot("occupancy") if self.before is not None else None
        if self.before is not None and after is not None:
            found["el2_diff"] = evidence.el2_diff(self.before, after)
            found["occupancy"] = {"pools": evidence.occupancy(after), "picture": self._picture(after)}
        found["unavailable"] = self.unavailable
        return found

    def _console(self, focus: str | None = None) -> dict[str, Any] | None:
        commands = self.target.commands[self.commands_from:]
        if isinstance(self.target, ConsoleLog) and self.console_from is not None:
            return evidence.console_excerpt(readable(self.target.console_text()[self.console_from:], commands),
                                            "console", focus=focus)
        try:                             # a board: the commands the test ran, then its kernel log
            return evidence.console_excerpt([f"$ {c}" for c in commands]
                                            + self.target.run("dmesg", timeout=30).stdout.splitlines(), "dmesg")
        except Exception as e:
            self.unavailable["console"] = f"dmesg failed: {type(e).__name__}: {e}"
            return None

    def _picture(self, snap: Any) -> str | None:
        from harness.el2.picture import render

        self.evidence_dir.mkdir(parents=True, exist_ok=True)
        try:
            render(snap, self.evidence_dir / "pools.png")
        except Exception as e:
            self.unavailable["picture"] = f"{type(e).__name__}: {e}"
            return None
        return str((self.evidence_dir / "pools.png").relative_to(self.evidence_dir.parent.parent))


def evidence_dir(run_dir: Path, nodeid: str) -> Path:
    return run_dir / "evidence" / _slug(nodeid)
