"""result.json, built in one place: the dataclasses of its parts (schema: result.schema.json).

`run`, `trace` and a suite session each fill a `Result`; `Result.to_dict()` is what is written,
and the unit tests validate it against the schema.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from harness.verdict import BootVerdict


@dataclass(frozen=True)
class KernelSummary:
    version: str
    source: str
    origin: str | None
    cache_key: str
    reused: bool
    build_seconds: float | None
    cold_build: bool | None
    artifacts: str

    @classmethod
    def of(cls, kernel: Any) -> KernelSummary:
        """From harness.kernel.build.KernelArtifacts."""
        m = kernel.meta
        return cls(m["version"], m["source"], m.get("origin"), kernel.key, kernel.reused, m.get("build_seconds"),
                   m.get("cold"), str(kernel.dir))


@dataclass(frozen=True)
class BootSummary:
    cpu: str
    smp: int
    mem: str
    cmdline: str | None = None
    qemu_exit: int | None = None
    pkvm_mode: str | None = None
    seconds_to_pkvm: float | None = None
    seconds_to_ready: float | None = None
    seconds_total: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("seconds_to_pkvm", "seconds_to_ready", "seconds_total"):
            if d[key] is not None:
                d[key] = round(d[key], 3)
        return d


@dataclass
class Result:
    """One run directory's verdict. `fields` holds what only one command has (a suite run's tests,
    a trace's divergence); the schema says which."""

    command: str                     # "run", "trace" or "suites"
    run_dir: str
    started_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    started: float = field(default_factory=time.time)
    outcome: str = "error"
    reason: str = ""
    stage: str | None = None
    exit_code: int = 0
    duration_s: float = 0.0
    kernel: KernelSummary | None = None
    boot: BootSummary | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)

    def judged(self, v: BootVerdict) -> None:
        """A boot's verdict: outcome, reason and the console events behind it."""
        self.outcome, self.reason = v.outcome.value, v.reason
        self.events = [asdict(e) for e in v.events]

    def finish(self, exit_code: int) -> None:
        self.exit_code = int(exit_code)
        self.duration_s = round(time.time() - self.started, 2)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"command": self.command, "started_at": self.started_at, "run_dir": self.run_dir,
                             "exit_code": self.exit_code, "outcome": self.outcome, "duration_s": self.duration_s}
        if self.command != "suites":           # a suite run's reason is only why it stopped early
            d.update(stage=self.stage or "", reason=self.reason, events=self.events)
        elif self.reason:
            d["reason"] = self.reason
        if self.kernel is not None or self.command == "suites":
            d["kernel"] = asdict(self.kernel) if self.kernel is not None else None
        if self.boot is not None:
            d["boot"] = self.boot.to_dict()
        return {**d, **self.fields}
