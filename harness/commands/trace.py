"""`pkvm-harness trace`: boot, run a command under an EL2 allocator trace, save the trace and its
snapshots, and replay it in the model. With el2trace (QEMU 9.1+, the default) the trace runs
from power-on; with --el2-plugin off, the gdbstub tracer covers the command only."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from harness import rundir
from harness.commands.run import finish
from harness.el2.snapshot import El2Reader
from harness.el2.trace import Trace, Tracer, save
from harness.errors import ExitCode, HarnessError
from harness.machine import Machine, MachineRequest, assemble
from harness.model.replay import ReplayResult
from harness.options import BootOptions, KernelOptions
from harness.replay import pool_names, replay_trace
from harness.report.evidence import divergence
from harness.report.result import BootSummary, KernelSummary, Result
from harness.targets.base import CommandResult


@dataclass
class TraceOutcome:
    run_dir: Path
    trace: Trace
    replay: ReplayResult
    names: dict[int, str]


def trace_command(kopts: KernelOptions, bopts: BootOptions, cache_dir: Path, runs_dir: Path, command: str,
                  timeout: float = 600.0, quiet: bool = False, packet_log: bool = False) -> TraceOutcome:
    request = MachineRequest.check(kopts, bopts, cache_dir, quiet=quiet)
    run_dir = rundir.create(runs_dir)
    result = Result("trace", str(run_dir.resolve()), stage="trace")
    machine = assemble(request, run_dir, gdb=True)
    packets: list[str] | None = [] if packet_log else None
    result.kernel = KernelSummary.of(machine.kernel)
    result.boot = BootSummary(machine.spec.cpu, machine.spec.smp, machine.spec.mem)
    try:
        if machine.spec.plugin is not None:
            output, trace = _with_plugin(machine, run_dir, cache_dir, command, timeout)
        else:
            with machine.start(run_dir) as target, \
                    El2Reader(target.qmp_socket, target.vmlinux, cache_dir) as reader, \
                    Tracer(reader, target.gdb_socket, packet_log=packets) as tracer:
                tracer.start()
                output = target.run(command, timeout=timeout)
                trace = tracer.stop()
    except HarnessError as e:
        result.outcome = {ExitCode.PANIC: "panic", ExitCode.TIMEOUT: "timeout"}.get(e.exit_code, "error")
        result.reason = e.one_line()
        finish(run_dir, result, e.exit_code)
        raise
    finally:
        if packets is not None:     # written on failure too: that is when it is wanted
            (run_dir / "gdb-packets.log").write_text("\n".join(packets) + "\n")
    (run_dir / "command.log").write_text(f"$ {command}\nexit {output.status}\n{output.stdout}{output.stderr}")
    save(trace, run_dir)
    replayed, names = replay_trace(trace), pool_names(trace)
    judge_replay(result, command, output.status, trace, replayed)
    finish(run_dir, result, ExitCode.PASS if replayed.ok else ExitCode.TEST_FAILURE)
    return TraceOutcome(run_dir, trace, replayed, names)


def _with_plugin(machine: Machine, run_dir: Path, cache_dir: Path, command: str,
                 timeout: float) -> tuple[CommandResult, Trace]:
    """el2trace: every call from power-on to the end of the command (boot included), the final
    snapshot taken while paused at the last record read."""
    from harness.replay import LiveReplay

    assert machine.spec.plugin is not None
    started = time.monotonic()
    with machine.start(run_dir) as target, El2Reader(target.qmp_socket, target.vmlinux, cache_dir) as reader:
        live = LiveReplay(machine.spec.plugin[2], keep_ops=True)
        output = target.run(command, timeout=timeout)
        final = reader.snapshot(while_paused=live.poll)
    assert live.ops is not None
    # The stream goes on until QEMU exits (the block counts come last): where the snapshot's
    # instant falls in it is kept, so the file replays to this snapshot offline.
    (run_dir / "el2trace-snapshot-offset").write_text(f"{live.follower.offset}\n")
    return output, Trace(live.ops, None, final, live.calls.coverage.probe_hits_not_at_el2,
                         time.monotonic() - started)


def judge_replay(result: Result, command: str, status: int, trace: Trace, replayed: ReplayResult) -> None:
    """A traced command's verdict: its replay, and the first divergence."""
    calls = len(trace.ops)
    result.outcome, result.stage = ("pass" if replayed.ok else "fail"), "replay"
    result.reason = (f"{replayed.ops} of {calls} traced allocator calls replayed, "
                     + ("0 divergences" if replayed.ok else "the kernel and the model disagree"))
    result.fields.update(traced_command=command, command_exit=status, operations=calls,
                         per_pool=replayed.per_pool, divergence=divergence(replayed))
