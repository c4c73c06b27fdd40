"""`pkvm-harness inject`: fail EL2 allocations on purpose, on a QEMU target.

Three forms, each on one boot (rebooted after a panic):
- no --site, no --sweep: count the workload's calls at each allocation site (nothing fails);
- --site S --nth N [--pool P]: fail that one call and judge the run (harness.sweep.run_one);
- --sweep: one run per call the workload makes, a table of them (harness.sweep.sweep).
The run directory keeps inject.json (every row, every call counted) and inject.md (the table).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness import rundir
from harness import sweep as sw
from harness.commands.run import finish
from harness.el2.inject import Plan
from harness.el2.snapshot import El2Reader
from harness.errors import ExitCode, HarnessError
from harness.image.payloads import GUEST_DIR
from harness.machine import MachineRequest, assemble
from harness.options import BootOptions, KernelOptions
from harness.report.result import BootSummary, KernelSummary, Result


@dataclass(frozen=True)
class InjectRequest:
    workload: str = "lifecycle"         # lifecycle or random
    vcpus: int = 1
    seed: int = 1
    command: str | None = None          # a shell command instead of a named workload
    plan: Plan | None = None            # one run with this call failed
    sweep: bool = False
    limit: int | None = None            # a sweep of the first N calls only


@dataclass
class InjectOutcome:
    run_dir: Path
    text: str                           # what the command prints
    code: ExitCode
    data: dict


def workload_of(req: InjectRequest) -> sw.Workload:
    if req.command:
        return sw.Workload("command", (req.command,))
    if req.workload == "random":
        return sw.randomized(GUEST_DIR, req.seed)
    return sw.lifecycle(GUEST_DIR, req.vcpus)


def inject_command(kopts: KernelOptions, bopts: BootOptions, cache_dir: Path, runs_dir: Path, req: InjectRequest,
                   quiet: bool = False, progress: Callable[[str], None] | None = None) -> InjectOutcome:
    request = MachineRequest.check(kopts, bopts, cache_dir, quiet=quiet)
    run_dir = rundir.create(runs_dir)
    result = Result("inject", str(run_dir.resolve()), stage="inject")
    machine = assemble(request, run_dir, gdb=True)
    result.kernel = KernelSummary.of(machine.kernel)
    result.boot = BootSummary(machine.spec.cpu, machine.spec.smp, machine.spec.mem)
    workload = workload_of(req)
    try:
        with machine.start(run_dir) as target:
            def reopen() -> El2Reader:
                return El2Reader(target.qmp_socket, target.vmlinux, cache_dir)

            m = sw.Machine(target, reopen(), reopen)
            rows: list[sw.Row] = []
            try:
                outcome = _run(m, workload, req, progress, rows)
            except BaseException:
                if rows:           # the runs finished so far are kept
                    (run_dir / "inject.json").write_text(json.dumps({"partial": True, "rows": [r.to_dict()
                                                                     for r in rows]}, indent=2) + "\n")
                raise
            finally:
                m.reader.close()
    except HarnessError as e:
        result.outcome = {ExitCode.PANIC: "panic", ExitCode.TIMEOUT: "timeout"}.get(e.exit_code, "error")
        result.reason = e.one_line()
        finish(run_dir, result, e.exit_code)
        raise
    (run_dir / "inject.json").write_text(json.dumps(outcome.data, indent=2) + "\n")
    (run_dir / "inject.md").write_text(outcome.text + "\n")
    result.outcome = "pass" if outcome.code == ExitCode.PASS else "fail"
    finish(run_dir, result, outcome.code)
    outcome.run_dir = run_dir
    return outcome


def _run(m: sw.Machine, workload: sw.Workload, req: InjectRequest,
         progress: Callable[[str], None] | None, rows: list[sw.Row]) -> InjectOutcome:
    if req.sweep:
        def each(row: sw.Row) -> None:
            rows.append(row)
            if progress:
                progress(f"{row.plan}: {row.verdict}")

        res = sw.sweep(m, workload, limit=req.limit, progress=each)
        unfired = sum(r.verdict == sw.UNFIRED for r in res.rows)
        head = (f"{workload.name}: {len(res.counted.calls)} allocation calls ({_counts(res.counted.counts())}); "
                f"{len(res.rows)} runs in {res.seconds:.0f}s ({unfired} not reached); "
                f"{len(res.findings)} unexplained finding(s)")
        return InjectOutcome(Path(), head + "\n\n" + res.table(),
                             ExitCode.TEST_FAILURE if res.findings else ExitCode.PASS, res.to_dict())
    sw.warm(m.target, workload)
    if req.plan is None:
        counted = sw.count(m, workload)
        lines = [f"{workload.name}: {len(counted.calls)} allocation calls ({_counts(counted.counts())})",
                 *(f"  {c.seq:3d} {c}" for c in counted.calls)]
        return InjectOutcome(Path(), "\n".join(lines), ExitCode.PASS, counted.to_dict())
    row = sw.run_one(m, workload, req.plan)
    lines = [f"{req.plan}: {row.failed or 'did not fire (the workload made fewer such calls)'}",
             f"host saw: {row.host_saw}", f"verdict: {row.verdict}",
             *(f"  {d}" for d in row.details)]
    if row.explained:
        lines.append(f"explained: {row.explained}")
    bad = row.finding or row.verdict == sw.UNFIRED
    code = {sw.PANICKED: ExitCode.PANIC}.get(row.verdict, ExitCode.TEST_FAILURE if bad else ExitCode.PASS)
    return InjectOutcome(Path(), "\n".join(lines), code, row.to_dict())


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"
