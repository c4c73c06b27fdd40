"""`pkvm-harness run` (and `boot`): build, boot with kvm-arm.mode=protected, judge, keep a run directory.

Inputs are validated before anything is written; each stage's failure is recorded in the run
directory's result.json with the exit code of its kind.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pexpect

from harness import rundir, verdict
from harness.errors import BuildError, ExitCode, HarnessError
from harness.machine import MachineRequest, assemble
from harness.options import BootOptions, KernelOptions
from harness.report.result import BootSummary, KernelSummary, Result
from harness.targets.qemu_boot import BootFailed


@dataclass
class RunOutcome:
    exit_code: ExitCode
    run_dir: Path
    result: dict[str, Any]


def run(kopts: KernelOptions, bopts: BootOptions, cache_dir: Path, runs_dir: Path,
        quiet: bool = False, interactive: bool = False) -> RunOutcome:
    request = MachineRequest.check(kopts, bopts, cache_dir, quiet=quiet)   # bad input fails here, before any write
    run_dir = rundir.create(runs_dir)
    result = Result("run", str(run_dir.resolve()), stage="build")
    try:
        machine = assemble(request, run_dir, payloads=False, console_pty=interactive)
        result.kernel = KernelSummary.of(machine.kernel)
        result.fields["initramfs"] = {"path": str(machine.initramfs.path), "sha256": machine.initramfs.sha256,
                                      "packages": list(machine.initramfs.packages)}
        shutil.copy2(machine.kernel.config, run_dir / "kernel.config")
        result.stage = "boot"
        boot_started = time.monotonic()
        try:
            target = machine.start(run_dir)
        except BootFailed as e:
            v, ready, qemu_exit = e.verdict, e.state, e.qemu_exit
        else:
            try:
                if interactive:
                    print("pkvm-harness: console attached; Ctrl-] detaches and powers the machine off", flush=True)
                    assert target.machine is not None and isinstance(target.machine.child, pexpect.spawn)
                    target.machine.child.interact(escape_character="\x1d")
            finally:
                target.close()
            assert target.ready is not None and target.last_machine is not None
            v, ready, qemu_exit = target.final_verdict(), target.ready, target.last_machine.exit_status
        spec = machine.spec
        result.boot = BootSummary(spec.cpu, spec.smp, spec.mem, spec.cmdline(), qemu_exit, v.pkvm_mode,
                                  ready.seconds_to_pkvm, ready.seconds_to_ready, time.monotonic() - boot_started)
        result.judged(v)
        result.stage = "pass" if v.exit_code == ExitCode.PASS else failed_stage(v)
        code = v.exit_code
    except HarnessError as e:
        if isinstance(e, BuildError) and e.log is not None and e.log.is_file():
            shutil.copy2(e.log, run_dir / "build.log")
        result.outcome, result.reason = "error", e.one_line()
        result.stage = e.stage if e.stage != "usage" else result.stage
        finish(run_dir, result, e.exit_code)
        raise
    except KeyboardInterrupt:
        result.outcome, result.reason = "interrupted", "interrupted (Ctrl-C or SIGTERM)"
        finish(run_dir, result, ExitCode.INTERRUPTED)
        raise
    finish(run_dir, result, code)
    return RunOutcome(code, run_dir, result.to_dict())


def failed_stage(v: verdict.BootVerdict) -> str:
    kinds = {e.kind for e in v.events}
    if kinds & {"el2-panic", "el2-bug"}:
        return "el2-panic"
    if v.outcome is verdict.Outcome.TIMEOUT:
        return "boot-timeout"
    return "pkvm-init" if v.pkvm_mode is None else "boot-checks"


def finish(run_dir: Path, result: Result, code: ExitCode) -> None:
    """result.json and junit.xml of a `run` or `trace`."""
    result.finish(code)
    data = result.to_dict()
    rundir.write_result(run_dir, data)
    rundir.write_run_junit(run_dir, data)
