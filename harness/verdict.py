"""Judge a pKVM boot from its console log.

Pure text in, verdict out: the same code judges a live boot and a golden log in the unit tests.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from enum import Enum

from harness.errors import ExitCode

# `kvm [1]: Protected nVHE mode initialized successfully` (arch/arm64/kvm/arm.c)
PKVM_UP_RE = re.compile(r"Protected (nVHE|hVHE) mode initialized successfully")
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\r")


class Outcome(str, Enum):
    PASS = "pass"
    FAIL = "fail"        # booted, but a check failed
    PANIC = "panic"      # kernel panic, oops, BUG, or an EL2 panic
    TIMEOUT = "timeout"

    @property
    def exit_code(self) -> ExitCode:
        return {Outcome.PASS: ExitCode.PASS, Outcome.FAIL: ExitCode.TEST_FAILURE,
                Outcome.PANIC: ExitCode.PANIC, Outcome.TIMEOUT: ExitCode.TIMEOUT}[self]


@dataclass(frozen=True)
class Pattern:
    kind: str
    regex: re.Pattern[str]
    outcome: Outcome
    before: int = 3   # console lines kept around the match for the report
    after: int = 25


# Order matters only for the headline: the first PANIC-class event found names the failure.
PATTERNS = (
    Pattern("el2-panic", re.compile(r"nVHE hyp panic at:"), Outcome.PANIC),
    Pattern("el2-bug", re.compile(r"nVHE hyp BUG at:"), Outcome.PANIC),
    Pattern("kernel-panic", re.compile(r"Kernel panic - not syncing"), Outcome.PANIC, after=10),
    Pattern("oops", re.compile(r"Internal error: |Unable to handle kernel "), Outcome.PANIC),
    Pattern("bug", re.compile(r"kernel BUG at |\bBUG: "), Outcome.PANIC),
    Pattern("warn", re.compile(r"WARNING: CPU: \d+ PID: \d+ at "), Outcome.FAIL, before=1, after=20),
    Pattern("pkvm-init-failed",
            re.compile(r"Failed to init hyp memory protection|Failed to finalize Hyp protection"
                       r"|Failed to register hyp memblocks|Failed to reserve hyp memory"
                       r"|error initializing Hyp mode|error initializing KVM"), Outcome.FAIL, after=5),
)


PANIC_KINDS = frozenset(p.kind for p in PATTERNS if p.outcome is Outcome.PANIC)


@dataclass
class Event:
    kind: str
    line_no: int          # 1-based, in the cleaned console log
    line: str
    excerpt: list[str]


@dataclass
class BootVerdict:
    outcome: Outcome
    reason: str
    pkvm_mode: str | None = None       # "nVHE" or "hVHE" when pKVM came up
    ready: bool = False                # the init script's ready marker was seen
    events: list[Event] = field(default_factory=list)

    @property
    def exit_code(self) -> ExitCode:
        return self.outcome.exit_code

    def to_dict(self) -> dict:
        d = asdict(self)
        d["outcome"] = self.outcome.value
        return d


def clean(text: str) -> list[str]:
    """Console text -> lines without terminal escape codes or carriage returns."""
    return ANSI_RE.sub("", text).split("\n")


def scan(lines: list[str]) -> list[Event]:
    events = []
    for i, line in enumerate(lines):
        for p in PATTERNS:
            if p.regex.search(line):
                excerpt = lines[max(0, i - p.before): i + p.after + 1]
                events.append(Event(p.kind, i + 1, line.strip(), excerpt))
                break
    return events


def panics(text: str) -> list[Event]:
    """The panic-class events (kernel panic, oops, BUG, EL2 panic or BUG) in console text."""
    return [e for e in scan(clean(text)) if e.kind in PANIC_KINDS]


def judge(text: str, *, ready_marker: str, timed_out: bool = False,
          expect_mode: str | None = None) -> BootVerdict:
    """The verdict on one boot. `expect_mode` ("nVHE"/"hVHE"), if given, must match."""
    lines = clean(text)
    events = scan(lines)
    modes = [m.group(1) for line in lines if (m := PKVM_UP_RE.search(line))]
    mode = modes[0] if modes else None
    ready = any(ready_marker in line for line in lines)
    kinds = {p.kind: p.outcome for p in PATTERNS}

    panics = [e for e in events if kinds[e.kind] is Outcome.PANIC]
    if panics:
        first = panics[0]
        return BootVerdict(Outcome.PANIC, f"{first.kind} at console line {first.line_no}: {first.line}",
                           mode, ready, events)
    if timed_out:
        where = "before the ready marker" if not ready else "after the ready marker"
        last = next((line.strip() for line in reversed(lines) if line.strip()), "(no output)")
        return BootVerdict(Outcome.TIMEOUT, f"timed out {where}; last console line: {last}",
                           mode, ready, events)
    failures = [e for e in events if kinds[e.kind] is Outcome.FAIL]
    if failures:
        first = failures[0]
        return BootVerdict(Outcome.FAIL, f"{first.kind} at console line {first.line_no}: {first.line}",
                           mode, ready, events)
    if not ready:
        return BootVerdict(Outcome.FAIL, "the console ended before the init script's ready marker",
                           mode, ready, events)
    if mode is None:
        return BootVerdict(Outcome.FAIL, "pKVM did not initialize: no 'Protected nVHE/hVHE mode "
                           "initialized successfully' line (is kvm-arm.mode=protected set?)", mode, ready, events)
    if expect_mode and mode.lower() != expect_mode.lower():
        return BootVerdict(Outcome.FAIL, f"pKVM came up in {mode} mode, expected {expect_mode}",
                           mode, ready, events)
    return BootVerdict(Outcome.PASS, f"Protected {mode} mode initialized successfully", mode, ready, events)
