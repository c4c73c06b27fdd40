"""The `run` pipeline: source -> config -> build -> initramfs -> boot -> verdict -> run directory.

Inputs are validated before anything is written; each stage's failure is recorded in the run
directory's result.json with the exit code of its kind.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from pathlib import Path

from harness import rundir
from harness.boot import BootResult, boot
from harness.errors import BuildError, ExitCode, HarnessError
from harness.image.initramfs import READY_MARKER, Initramfs, build_initramfs
from harness.kernel import config as kconfig
from harness.kernel import source as ksource
from harness.kernel.build import BuildRequest, KernelArtifacts, build
from harness.targets.qemu import QemuSpec, find_qemu, qmp_socket_path


@dataclass
class KernelOptions:
    kernel_src: Path | None = None
    kernel: str | None = None          # "6.1", "6.12": a Debian linux-source package
    fragments: list[str] = field(default_factory=list)
    kconfig: list[str] = field(default_factory=list)
    cross_compile: str = "aarch64-linux-gnu-"
    jobs: int | None = None
    build_timeout: float = 3600.0
    patches: list[Path] = field(default_factory=list)


@dataclass
class BootOptions:
    cpu: str = "max"
    smp: int = 2
    mem: str = "1024"
    append: list[str] = field(default_factory=list)
    qemu: str = "qemu-system-aarch64"
    qemu_args: list[str] = field(default_factory=list)
    timeout: float = 120.0
    expect_mode: str | None = None


def build_request(opts: KernelOptions, cache_dir: Path, quiet: bool = False) -> BuildRequest:
    """Validate the kernel inputs (no build yet): source, fragments, compiler."""
    kconfig.merge(opts.fragments, opts.kconfig)       # bad fragments are refused before any unpacking
    source = ksource.with_patches(ksource.resolve(opts.kernel_src, cache_dir, quiet=quiet, kernel=opts.kernel),
                                  [Path(p) for p in opts.patches], cache_dir, quiet=quiet)
    requested = kconfig.merge(opts.fragments, opts.kconfig, version=source.version)
    req = BuildRequest(source=source, requested=requested, cache_dir=cache_dir,
                       cross_compile=opts.cross_compile, timeout=opts.build_timeout, quiet=quiet,
                       **({"jobs": opts.jobs} if opts.jobs else {}))
    return req


def qemu_spec(b: BootOptions, kernel: KernelArtifacts, initramfs: Initramfs, run_dir: Path) -> QemuSpec:
    return QemuSpec(kernel=kernel.image, initrd=initramfs.path, qmp_socket=qmp_socket_path(run_dir),
                    cpu=b.cpu, smp=b.smp, mem=b.mem, append=" ".join(b.append), qemu=b.qemu,
                    extra_args=tuple(b.qemu_args))


def kernel_summary(k: KernelArtifacts) -> dict:
    return {"version": k.meta["version"], "source": k.meta["source"], "origin": k.meta["origin"],
            "cache_key": k.key, "reused": k.reused, "build_seconds": k.meta["build_seconds"],
            "cold_build": k.meta["cold"], "artifacts": str(k.dir)}


def boot_summary(spec: QemuSpec, r: BootResult) -> dict:
    return {"cpu": spec.cpu, "smp": spec.smp, "mem": spec.mem, "cmdline": spec.cmdline(),
            "qemu_exit": r.qemu_exit, "pkvm_mode": r.verdict.pkvm_mode,
            "seconds_to_pkvm": _round(r.seconds_to_pkvm), "seconds_to_ready": _round(r.seconds_to_ready),
            "seconds_total": _round(r.seconds_total)}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


@dataclass
class RunOutcome:
    exit_code: ExitCode
    run_dir: Path
    result: dict


def run(kopts: KernelOptions, bopts: BootOptions, cache_dir: Path, runs_dir: Path,
        quiet: bool = False, interactive: bool = False) -> RunOutcome:
    req = build_request(kopts, cache_dir, quiet=quiet)   # bad input fails here, before any write
    find_qemu(bopts.qemu)
    run_dir = rundir.create(runs_dir)
    started = time.time()
    result: dict = {"command": "run", "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "run_dir": str(run_dir.resolve())}
    stage = "build"
    try:
        kernel = build(req)
        result["kernel"] = kernel_summary(kernel)
        shutil.copy2(kernel.config, run_dir / "kernel.config")
        stage = "rootfs"
        initramfs = build_initramfs(cache_dir)
        result["initramfs"] = {"path": str(initramfs.path), "sha256": initramfs.sha256,
                               "packages": list(initramfs.packages)}
        stage = "boot"
        spec = qemu_spec(bopts, kernel, initramfs, run_dir)
        if interactive:
            spec = dc_replace(spec, console_pty=True)       # a person's terminal needs a pty
        rundir.write_qemu_command(run_dir, spec.shell_line())
        r = boot(spec, run_dir / "console.log", timeout=bopts.timeout, ready_marker=READY_MARKER,
                 expect_mode=bopts.expect_mode, keep_running=_interact if interactive else None)
        result["boot"] = boot_summary(spec, r)
        result.update(outcome=r.verdict.outcome.value, reason=r.verdict.reason,
                      stage="pass" if r.verdict.exit_code == ExitCode.PASS else _failed_stage(r),
                      events=[e.__dict__ for e in r.verdict.events])
        code = r.verdict.exit_code
    except HarnessError as e:
        if isinstance(e, BuildError) and e.log.is_file():
            shutil.copy2(e.log, run_dir / "build.log")
        result.update(outcome="error", stage=e.stage if e.stage != "usage" else stage,
                      reason=e.one_line(), events=[])
        code = e.exit_code
        _finish(run_dir, result, code, started)
        raise
    except KeyboardInterrupt:
        result.update(outcome="interrupted", stage=stage, reason="interrupted (Ctrl-C or SIGTERM)", events=[])
        _finish(run_dir, result, ExitCode.INTERRUPTED, started)
        raise
    _finish(run_dir, result, code, started)
    return RunOutcome(code, run_dir, result)


def _interact(machine, console) -> None:
    print("pkvm-harness: console attached; Ctrl-] detaches and powers the machine off", flush=True)
    console.child.interact(escape_character="\x1d")


def _failed_stage(r: BootResult) -> str:
    kinds = {e.kind for e in r.verdict.events}
    if kinds & {"el2-panic", "el2-bug"}:
        return "el2-panic"
    if r.verdict.outcome.value == "timeout":
        return "boot-timeout"
    return "pkvm-init" if r.verdict.pkvm_mode is None else "boot-checks"


def _finish(run_dir: Path, result: dict, code: ExitCode, started: float) -> None:
    result["exit_code"] = int(code)
    result["duration_s"] = round(time.time() - started, 2)
    rundir.write_result(run_dir, result)
    rundir.write_run_junit(run_dir, result)


def _prepare_qemu(kopts: KernelOptions, bopts: BootOptions, cache_dir: Path, runs_dir: Path, quiet: bool,
                  gdb: bool = False) -> tuple[Path, KernelArtifacts, QemuSpec]:
    """Inputs checked, a run directory, the kernel, an image with the guest payloads, and the
    QEMU spec (with a gdbstub socket when tracing), its command written to the run directory."""
    from harness.image.payloads import build_payloads
    from harness.targets.qemu import socket_path

    req = build_request(kopts, cache_dir, quiet=quiet)
    find_qemu(bopts.qemu)
    run_dir = rundir.create(runs_dir)
    kernel = build(req)
    initramfs = build_initramfs(cache_dir, build_payloads(req, kernel))
    spec = qemu_spec(bopts, kernel, initramfs, run_dir)
    if gdb:
        spec = dc_replace(spec, gdb_socket=socket_path(run_dir, "gdb.sock"))
    rundir.write_qemu_command(run_dir, spec.shell_line())
    return run_dir, kernel, spec


def inspect_booted(kopts: KernelOptions, bopts: BootOptions, cache_dir: Path, runs_dir: Path,
                   before: str | None = None, quiet: bool = False):
    """Boot a QEMU target (with the guest payloads), optionally run a command, snapshot EL2."""
    from harness.el2.snapshot import El2Reader
    from harness.targets.qemu_target import QemuTarget

    run_dir, kernel, spec = _prepare_qemu(kopts, bopts, cache_dir, runs_dir, quiet)
    with QemuTarget(spec, run_dir, boot_timeout=bopts.timeout) as target:
        if before:
            target.run(before, timeout=300).check()
        with El2Reader(target.qmp_socket, kernel.vmlinux, cache_dir) as reader:
            return reader.snapshot()


@dataclass
class TraceOutcome:
    run_dir: Path
    trace: object          # harness.el2.trace.Trace
    replay: object         # harness.model.replay.ReplayResult
    names: dict[int, str]


def trace_command(kopts: KernelOptions, bopts: BootOptions, cache_dir: Path, runs_dir: Path, command: str,
                  timeout: float = 600.0, quiet: bool = False, packet_log: bool = False) -> TraceOutcome:
    """Boot a QEMU target with its gdbstub, run `command` under an EL2 allocator trace, save the
    trace and both snapshots in the run directory, and replay it in the model."""
    from harness.el2.snapshot import El2Reader
    from harness.el2.trace import Tracer, save
    from harness.targets.qemu_target import QemuTarget

    started, started_at = time.time(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    run_dir, kernel, spec = _prepare_qemu(kopts, bopts, cache_dir, runs_dir, quiet, gdb=True)
    packets: list[str] | None = [] if packet_log else None
    summary = {"command": "trace", "started_at": started_at, "run_dir": str(run_dir.resolve()),
               "kernel": kernel_summary(kernel), "boot": {"cpu": spec.cpu, "smp": spec.smp, "mem": spec.mem}}
    try:
        with QemuTarget(spec, run_dir, boot_timeout=bopts.timeout) as target, \
                El2Reader(target.qmp_socket, kernel.vmlinux, cache_dir) as reader, \
                Tracer(reader, spec.gdb_socket, packet_log=packets) as tracer:
            tracer.start()
            output = target.run(command, timeout=timeout)
            trace = tracer.stop()
    except HarnessError as e:
        outcome = {ExitCode.PANIC: "panic", ExitCode.TIMEOUT: "timeout"}.get(e.exit_code, "error")
        _finish(run_dir, {**summary, "outcome": outcome, "stage": "trace", "reason": e.one_line(), "events": []},
                e.exit_code, started)
        raise
    finally:
        if packets is not None:     # written on failure too: that is when it is wanted
            (run_dir / "gdb-packets.log").write_text("\n".join(packets) + "\n")
    (run_dir / "command.log").write_text(f"$ {command}\nexit {output.status}\n{output.stdout}{output.stderr}")
    save(trace, run_dir)
    result, names = replay_trace(trace), pool_names(trace)
    summary.update(trace_summary(command, output.status, trace, result))
    _finish(run_dir, summary, ExitCode.PASS if result.ok else ExitCode.TEST_FAILURE, started)
    return TraceOutcome(run_dir, trace, result, names)


def trace_summary(command: str, status: int, trace, result) -> dict:
    """The result.json fields of a traced command: its replay's verdict and first divergence."""
    from harness.report.evidence import divergence

    calls = len(trace.ops)
    return {"outcome": "pass" if result.ok else "fail", "stage": "replay",
            "reason": f"{result.ops} of {calls} traced allocator calls replayed, "
                      + ("0 divergences" if result.ok else "the kernel and the model disagree"),
            "traced_command": command, "command_exit": status, "operations": calls,
            "per_pool": result.per_pool, "divergence": divergence(result), "events": []}


def pool_names(trace) -> dict[int, str]:
    names = {p.struct_pa: n for n, p in trace.initial.pools.items()}
    if trace.final is not None:
        names.update({p.struct_pa: n for n, p in trace.final.pools.items()})
    return names


def replay_trace(trace):
    """Replay a live trace (harness.el2.trace.Trace) in the model, from its initial snapshot to its final one."""
    from harness.model.replay import replay

    return replay({p.struct_pa: p for p in trace.initial.pools.values()}, trace.ops,
                  {p.struct_pa: p for p in trace.final.pools.values()} if trace.final else None,
                  trace.initial.kernel_version, pool_names(trace))


def replay_saved(path: Path):
    """Replay a saved trace (trace.jsonl or its run directory) offline."""
    from harness.el2.trace import load, pools_from_json
    from harness.model.replay import replay

    ops, initial, final = load(path)
    init_pools = pools_from_json(initial["pools"])
    final_pools = pools_from_json(final["pools"]) if final else None
    names = {pa: p.name for pa, p in init_pools.items()}
    if final_pools:
        names.update({pa: p.name for pa, p in final_pools.items()})
    return replay(init_pools, ops, final_pools, initial["kernel_version"], names)
