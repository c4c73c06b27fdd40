"""A fault sweep: run a workload once per EL2 allocation it makes, failing that one allocation.

First a counting run (no failure) lists every call the workload makes at each allocation site
(harness.el2.inject). Then, for each call N, the workload runs again with call N failed, and:
- a panic (hyp or host) is a finding, with its console line; the machine is rebooted for the next N;
- the workload may fail (the host saw the error) or succeed (EL2 or the host retried); either way
  the host must go on: the workload runs once more, unfailed, and must succeed;
- every invariant must hold after it, and EL2 must be back at the baseline taken before the run
  (harness.model.baseline): a leak names its pages, its pool and what each page is.
A row per run: the site and N, what failed, and handled / leaked / broken / stuck / panicked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harness.el2.inject import Injection, Injector, Plan
from harness.el2.snapshot import El2Reader
from harness.errors import ExitCode, HarnessError, InfraError
from harness.model.baseline import leftovers
from harness.model.error_paths import explain
from harness.model.invariants import render, run_checks
from harness.targets.base import CommandResult, CommandTimeout, Target, TargetDead, TargetPanicked
from harness.targets.guests import guest_args, random_workload


class WorkloadFails(HarnessError):
    """The workload fails with nothing injected: the sweep has no baseline to judge against."""

    exit_code = ExitCode.TEST_FAILURE

    def __init__(self, line: str) -> None:
        super().__init__(f"the workload fails with nothing injected: {line}",
                         hint="run it on its own first (pkvm-harness run, then the command on the target)")


HANDLED, LEAKED, BROKEN, STUCK, PANICKED = "handled", "leaked", "broken", "stuck", "panicked"
UNFIRED = "not reached"        # the workload made fewer such calls this time: nothing was failed
FINDINGS = (LEAKED, BROKEN, STUCK, PANICKED)


@dataclass(frozen=True)
class Workload:
    name: str
    commands: tuple[str, ...]          # run in order; each must succeed when nothing is failed
    timeout: float = 300.0


@dataclass
class Row:
    plan: Plan
    failed: str | None                 # the call that failed ("hyp_alloc_pages call 3 (hpool) from ...")
    host_saw: str                      # the workload's error line, or "nothing (it succeeded)"
    verdict: str
    details: list[str] = field(default_factory=list)
    explained: str | None = None       # the kernel's own reason (harness.model.error_paths), if known
    seconds: float = 0.0

    @property
    def finding(self) -> bool:
        return self.verdict in FINDINGS and self.explained is None

    def to_dict(self) -> dict:
        return {"site": self.plan.site, "nth": self.plan.nth, "failed": self.failed, "host_saw": self.host_saw,
                "verdict": self.verdict, "details": self.details, "explained": self.explained,
                "seconds": round(self.seconds, 2)}


@dataclass
class SweepResult:
    workload: Workload
    counted: Injection
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def findings(self) -> list[Row]:
        return [r for r in self.rows if r.finding]

    def table(self) -> str:
        """Markdown: a row per run, then the details of every run that did not end handled."""
        lines = ["| site | N | failed call | host saw | verdict |", "|---|---|---|---|---|"]
        for r in self.rows:
            verdict = f"{r.verdict} (explained)" if r.explained and r.verdict in FINDINGS else r.verdict
            lines.append(f"| {r.plan.site} | {r.plan.nth} | {r.failed or 'did not fire'} | {r.host_saw} "
                         f"| {verdict} |")
        for r in self.rows:
            if r.verdict in FINDINGS:
                lines += ["", f"{r.plan}: {r.verdict}" + (f" ({r.explained})" if r.explained else "")]
                lines += [f"    {d}" for d in r.details]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"workload": self.workload.name, "commands": list(self.workload.commands),
                "counted": self.counted.to_dict(), "runs": len(self.rows), "seconds": round(self.seconds, 1),
                "findings": len(self.findings), "rows": [r.to_dict() for r in self.rows]}


def lifecycle(guest_dir: str, vcpus: int = 1) -> Workload:
    """One VM with `vcpus` vCPUs: created, run, its memory touched, destroyed."""
    args = guest_args(vms=1, vcpus=vcpus, pages=16)
    return Workload(f"lifecycle ({vcpus} vCPU)", (f"{guest_dir}/pkvm_guest {args}",))


def randomized(guest_dir: str, seed: int) -> Workload:
    """The allocator suite's randomized workload for `seed`."""
    return Workload(f"random (seed {seed})", tuple(f"{guest_dir}/pkvm_guest {a}" for a in random_workload(seed)))


class Machine:
    """What a sweep drives: a target with its El2Reader, which `reboot` replaces after a panic."""

    def __init__(self, target: Target, reader: El2Reader, reopen: Callable[[], El2Reader] | None,
                 snapshot: Callable[[El2Reader], Any] | None = None) -> None:
        self.target = target
        self.reader = reader
        self._reopen = reopen
        self.snapshot = snapshot or (lambda r: r.snapshot())

    @property
    def gdb_socket(self) -> Any:
        return self.target.gdb_socket      # type: ignore[attr-defined]

    def reboot(self) -> bool:
        """A fresh machine after a panic; False where the target cannot be rebooted."""
        if self._reopen is None:
            return False
        self.reader.close()
        self.target.reboot()
        self.reader = self._reopen()
        return True


def run_workload(target: Target, workload: Workload) -> CommandResult | None:
    """Each command in order, stopping at the first that fails (returned); None if all succeed."""
    for command in workload.commands:
        result = target.run(command, timeout=workload.timeout)
        if not result.ok:
            return result
    return None


def error_line(result: CommandResult | None) -> str:
    if result is None:
        return "nothing (it succeeded)"
    lines = [ln for ln in (result.stdout + result.stderr).splitlines() if "error" in ln.lower()]
    return (lines[-1] if lines else f"exit {result.status}").strip()[:160]


def warm(target: Target, workload: Workload) -> None:
    """One unfailed run, so the first VM's lasting hyp stage-1 tables are in every baseline after."""
    if (failed := run_workload(target, workload)) is not None:
        raise WorkloadFails(error_line(failed))


def count(machine: Machine, workload: Workload) -> Injection:
    """The calls the workload makes at each allocation site, none failed."""
    with Injector(machine.reader, machine.gdb_socket) as injector:
        failed = run_workload(machine.target, workload)
        counted = injector.stop()
    if failed is not None:
        raise WorkloadFails(error_line(failed))
    return counted


def plans_of(counted: Injection, limit: int | None = None) -> list[Plan]:
    """One plan per call the counting run saw, in the order they came. An allocator call is
    numbered within its pool: the host stage-2's allocations come when the host faults, not in
    step with the workload, so numbers across pools would shift from run to run."""
    plans = [Plan(c.site, c.nth_in_pool, c.pool) for c in counted.calls]
    return plans[:limit] if limit is not None else plans


def run_one(machine: Machine, workload: Workload, plan: Plan) -> Row:
    """The workload with `plan`'s call failed, judged; a machine that died or hangs is rebooted
    (and warmed again, as the sweep began)."""
    started = time.monotonic()
    before = machine.snapshot(machine.reader)
    injector = Injector(machine.reader, machine.gdb_socket, plan)
    try:
        with injector:
            outcome = run_workload(machine.target, workload)
            injector.stop()
        row = Row(plan, None, error_line(outcome), HANDLED)
        if injector.result.fired is None:
            row.verdict = UNFIRED
        else:
            _judge(machine, workload, before, row)
    except TargetDead as e:
        line = e.panic_line if isinstance(e, TargetPanicked) else e.one_line()
        row = Row(plan, None, "(the machine died)", PANICKED, [line])
        _restart(machine, workload)
    except CommandTimeout as e:
        row = Row(plan, None, "(no answer)", STUCK, [f"the workload did not end: {e.one_line()}"])
        _restart(machine, workload)
    except (OSError, TimeoutError, RuntimeError) as e:      # the gdbstub: a machine gone, or the injector
        if (death := machine.target.death()) is None:
            raise InfraError(f"fault injection failed at {plan}: {e}",
                             hint="the run directory's console.log shows what the machine did") from e
        row = Row(plan, None, "(the machine died)", PANICKED, [death])
        _restart(machine, workload)
    if (fired := injector.result.fired) is not None:
        row.failed = str(fired)
        row.explained = explain(fired.site, [fired.caller.split("+")[0], *fired.chain], row.verdict,
                                row.details)
    row.seconds = time.monotonic() - started
    return row


def _restart(machine: Machine, workload: Workload) -> None:
    """A fresh machine for the next run, warmed by one unfailed workload as the sweep began."""
    if machine.reboot():
        warm(machine.target, workload)


def _judge(machine: Machine, workload: Workload, before: Any, row: Row) -> None:
    after = machine.snapshot(machine.reader)
    if findings := run_checks(after):
        row.verdict = BROKEN
        row.details.append("invariants: " + render(findings))
    if left := leftovers(before, after):
        row.verdict = LEAKED if row.verdict == HANDLED else row.verdict
        row.details += [str(x) for x in left]
    again = run_workload(machine.target, workload)
    if again is not None:
        row.verdict = STUCK if row.verdict == HANDLED else row.verdict
        row.details.append(f"the host could not go on: the workload, run again unfailed, fails: {error_line(again)}")


def sweep(machine: Machine, workload: Workload, *, limit: int | None = None,
          progress: Callable[[Row], None] | None = None) -> SweepResult:
    """The counting run, then one run per call (the first `limit` calls, if given)."""
    started = time.monotonic()
    warm(machine.target, workload)
    result = SweepResult(workload, count(machine, workload))
    for plan in plans_of(result.counted, limit):
        row = run_one(machine, workload, plan)
        result.rows.append(row)
        if progress is not None:
            progress(row)
    result.seconds = time.monotonic() - started
    return result
