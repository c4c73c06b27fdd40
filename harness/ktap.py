"""TAP 13 / KTAP 1 output of kselftests, parsed into one result per test line (pure).

Only the top level counts: indented lines are a subtest's own subtests, which the subtest's
result line summarises. A test that prints no TAP at all (several KVM selftests) is judged by
its exit status alone: 0 pass, 4 skip (KSFT_SKIP), anything else fail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

RESULT_RE = re.compile(r"^(not ok|ok) (\d+)(?: -)? ?(.*?)(?:\s+#\s*(SKIP|TODO|XFAIL)\b\s*(.*))?$", re.IGNORECASE)
PLAN_RE = re.compile(r"^1\.\.(\d+)")
BAIL_RE = re.compile(r"^Bail out!\s*(.*)")
KSFT_SKIP = 4


@dataclass(frozen=True)
class TestResult:
    number: int
    name: str
    outcome: str            # "pass", "fail" or "skip"
    reason: str = ""


@dataclass
class TapReport:
    results: list[TestResult] = field(default_factory=list)
    plan: int | None = None
    bailed: str | None = None
    is_tap: bool = False

    def problems(self) -> list[str]:
        """What is wrong with the report as a whole (beyond failed tests)."""
        out = []
        if self.bailed is not None:
            out.append(f"bailed out: {self.bailed or '(no reason)'}")
        if self.plan is not None and len(self.results) != self.plan:
            out.append(f"planned {self.plan} tests, reported {len(self.results)}")
        numbers = [r.number for r in self.results]
        if numbers != list(range(1, len(numbers) + 1)):
            out.append(f"test numbers out of sequence: {numbers}")
        return out


def parse(output: str) -> TapReport:
    report = TapReport()
    for line in output.splitlines():
        if line[:1] in (" ", "\t"):
            continue                                    # nested: a subtest's own subtests
        if line.startswith(("TAP version", "KTAP version")):
            report.is_tap = True
        elif m := PLAN_RE.match(line):
            report.plan, report.is_tap = int(m.group(1)), True
        elif m := BAIL_RE.match(line):
            report.bailed = m.group(1)
        elif m := RESULT_RE.match(line):
            directive = (m.group(4) or "").upper()
            if directive == "SKIP":
                outcome = "skip"
            elif m.group(1).lower() == "ok" or directive in ("TODO", "XFAIL"):
                outcome = "pass"
            else:
                outcome = "fail"
            report.results.append(TestResult(int(m.group(2)), m.group(3).strip(), outcome, (m.group(5) or "").strip()))
            report.is_tap = True
    return report


def outcome_of_status(status: int) -> str:
    """A test without TAP: kselftest exit codes."""
    return "pass" if status == 0 else "skip" if status == KSFT_SKIP else "fail"
