"""pkvm-harness: one subcommand per user task.

Exit codes (harness/errors.py, docs/exit-codes.md): 0 pass, 1 test failure, 2 bad usage or missing
prerequisite, 10 kernel or EL2 panic, 11 timeout, 12 infrastructure error, 13 kernel build failure,
130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from harness import __version__, options
from harness.errors import ExitCode, HarnessError, UsageError
from harness.paths import default_runs_dir

EPILOG = ("exit codes: 0 pass, 1 test failure, 2 bad usage/missing prerequisite, 10 kernel or EL2 panic, "
          "11 timeout, 12 infrastructure error, 13 kernel build failure, 130 interrupted (docs/exit-codes.md)")


class _Parser(argparse.ArgumentParser):
    """argparse with the harness's one-line errors: what is wrong, and where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(int(ExitCode.USAGE), f"pkvm-harness: error: {self.prog.removeprefix('pkvm-harness ')}: {message}; "
                                        f"see `{self.prog} --help`\n")


def _common_args(p: argparse.ArgumentParser, cache: bool = True) -> None:
    if cache:
        options.add_to_argparse(p, kernel=False, boot=False)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def _qemu_command(sub: Any, name: str, helptext: str) -> Any:
    """A command that builds a kernel, boots it under QEMU and keeps a run directory."""
    p = sub.add_parser(name, help=helptext, epilog=EPILOG)
    options.add_to_argparse(p)
    _common_args(p, cache=False)
    p.add_argument("--runs-dir", type=Path, default=default_runs_dir(),
                   help="where run directories go (default: %(default)s; env PKVM_HARNESS_RUNS)")
    return p


def parser() -> _Parser:
    top = _Parser(prog="pkvm-harness", description="Build, boot and test arm64 protected KVM.", epilog=EPILOG)
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("doctor", help="list prerequisites, whether each is there, and the fix")
    _common_args(p)

    p = sub.add_parser("build", help="configure and build the kernel (or reuse the cache)", epilog=EPILOG)
    options.add_to_argparse(p, boot=False)
    p.add_argument("--board", action="store_true",
                   help="a test kernel for a board: adds the EL2 dump (--config pkvm-el2-dump) and says what "
                        "to install and how to run the suites against it (docs/boards.md)")
    _common_args(p, cache=False)

    p = sub.add_parser("rootfs", help="assemble the initramfs and print its path", epilog=EPILOG)
    _common_args(p)

    for name, helptext in (("run", "build, boot with kvm-arm.mode=protected, run the checks (the main job)"),
                           ("boot", "build and boot; --interactive hands you the console")):
        p = _qemu_command(sub, name, helptext)
        if name == "run":
            p.add_argument("--json", action="store_true", help="print result.json instead of the summary")
        if name == "boot":
            p.add_argument("--interactive", action="store_true",
                           help="after the ready marker, attach your terminal to the console (Ctrl-] detaches)")
    p = _qemu_command(sub, "inspect", "snapshot EL2 memory (pools, vmemmap, VMs, host stage-2) of a QEMU target")
    p.add_argument("--qmp", type=Path, metavar="SOCKET",
                   help="inspect a running QEMU through its QMP socket instead of booting one (needs --vmlinux)")
    p.add_argument("--vmlinux", type=Path, metavar="PATH", help="the running kernel's vmlinux (with --qmp)")
    p.add_argument("--run", metavar="CMD", help="run CMD on the booted target before the snapshot")
    p.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    p.add_argument("--png", type=Path, metavar="FILE", help="also draw the physical address map into FILE")
    p.add_argument("--check", action="store_true",
                   help="run the model's invariant checks on the snapshot; exit 1 if any finding")
    p = _qemu_command(sub, "test", "build, boot and run the suites on a kernel, with a summary (the developer's loop)")
    p.add_argument("-k", dest="test_expr", metavar="EXPR", help="pytest -k expression selecting the tests")
    p.add_argument("--suites", default="", metavar="LIST",
                   help="test_suites/ to run, comma-separated (default: all of them)")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per test while they run")
    p = _qemu_command(sub, "trace", "run COMMAND on a QEMU target while tracing every EL2 allocator call; replay it")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS", help="deadline for COMMAND")
    p.add_argument("--json", action="store_true", help="print result.json instead of the summary")
    p.add_argument("--packet-log", action="store_true",
                   help="also write every gdbstub packet to gdb-packets.log in the run directory (debugging)")
    p.add_argument("traced_command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="the shell command to run on the target, after --")

    from harness.el2.inject import POOLS, SITES
    p = _qemu_command(sub, "inject", "fail EL2 allocations on purpose: count a workload's calls per site, fail "
                      "one (--site, --nth), or sweep them all (--sweep)")
    p.add_argument("--site", choices=[s.name for s in SITES], help="the allocation site to fail")
    p.add_argument("--nth", type=options.positive_int, metavar="N", help="fail its Nth call (from 1)")
    p.add_argument("--pool", choices=POOLS, help="count only this pool's calls (vm: any VM's)")
    p.add_argument("--sweep", action="store_true", help="one run per allocation call of the workload, failing it")
    p.add_argument("--limit", type=options.positive_int, metavar="N", help="sweep the first N calls only")
    p.add_argument("--workload", choices=("lifecycle", "random"), default="lifecycle",
                   help="lifecycle: one VM created, run, its memory touched, destroyed; random: the allocator "
                        "suite's randomized workload for --seed (default: %(default)s)")
    p.add_argument("--vcpus", type=options.positive_int, default=1, metavar="K", help="the lifecycle VM's vCPUs")
    p.add_argument("--seed", type=int, default=1, help="the random workload's seed (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print inject.json instead of the table")
    p.add_argument("workload_command", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="a shell command to run on the target instead of --workload")

    p = sub.add_parser("bisect", epilog=EPILOG,
                       help="find the commit that broke EL2: build, boot and run the suites at each step")
    _common_args(p)
    p.add_argument("--repo", type=Path, metavar="PATH",
                   help="the kernel's git repository (never written: the bisect runs in a private worktree)")
    p.add_argument("--good", metavar="REV", help="a commit where the tests pass")
    p.add_argument("--bad", metavar="REV", help="a later commit where they fail")
    p.add_argument("-k", dest="test_expr", metavar="EXPR", help="pytest -k expression selecting the tests")
    p.add_argument("--suites", default="allocator,stage2", metavar="LIST",
                   help="test_suites/ to run at each step (default: %(default)s)")
    p.add_argument("--runs", type=int, default=1, metavar="N",
                   help="runs per step; the step is bad if any run is bad (default: %(default)s)")
    p.add_argument("--retries", type=int, default=2, metavar="N",
                   help="retries of a run that fails on infrastructure (default: %(default)s)")
    p.add_argument("--check-ends", action="store_true", help="first confirm that good is good and bad is bad")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted bisect from its run dir")
    p.add_argument("--runs-dir", type=Path, default=default_runs_dir(), help="where the run directory goes")
    options.add_to_argparse(p, cache=False, exclude=options.SOURCE_CHOICE)

    p = sub.add_parser("replay", epilog=EPILOG, help="replay a saved trace (trace.jsonl or its run directory)")
    p.add_argument("trace", type=Path, metavar="TRACE")
    p.add_argument("--json", action="store_true", help="print the replay's verdict as JSON")

    p = sub.add_parser("coverage", epilog="exit codes: 0 written, 2 no el2trace block counts in RUN_DIR",
                       help="EL2 line and function coverage of a run (el2trace's block counts): lcov .info and HTML")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_DIR/el2-coverage)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = sub.add_parser("report", epilog="exit codes: 0 rendered, 2 not a run directory or unreadable result.json",
                       help="render run directories (their result.json) as Markdown or one self-contained HTML page")
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR",
                   help="run directories; several (a CI matrix) give one report with a table of all")
    p.add_argument("--format", choices=["markdown", "html"], default="markdown",
                   help="markdown for CI summaries (default), html for a page with the pool pictures embedded")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="write to FILE instead of standard output")
    return top


def cmd_bisect(a: argparse.Namespace) -> int:
    import json

    from harness import rundir
    from harness.bisect import git as g
    from harness.bisect.engine import State, run_bisect
    from harness.bisect.runner import SuiteStep

    if a.resume:
        state_file = a.resume / "bisect.json"
        if not state_file.is_file():
            raise UsageError(f"{a.resume} holds no bisect.json", hint="pass the run directory of the bisect to resume")
        state, run_dir = State.load(state_file), a.resume
        params = state.params
    else:
        if not (a.repo and a.good and a.bad):
            raise UsageError("bisect needs --repo, --good and --bad (or --resume RUN_DIR)",
                             hint="pkvm-harness bisect --repo ~/linux --good v6.12 --bad HEAD")
        repo = a.repo.expanduser().resolve()
        if not (repo / ".git").exists():
            raise UsageError(f"--repo {a.repo} is not a git repository", hint="pass the root of a kernel git checkout")
        good, bad = g.resolve(repo, a.good), g.resolve(repo, a.bad)
        g.check_range(repo, good, bad)
        run_dir = rundir.create(a.runs_dir)
        # The options as arguments, so --resume parses them back through the same declaration.
        params = {"repo": str(repo), "good": good, "bad": bad, "test_expr": a.test_expr,
                  "suites": [s for s in a.suites.split(",") if s], "runs": a.runs, "retries": a.retries,
                  "options": options.to_argv(options.kernel_options(a), options.boot_options(a), a.cache_dir,
                                             prefix="--")}
        state = State.new(run_dir / "bisect.json", **params)
        state.save()
    repo = Path(params["repo"])
    tree = g.worktree_for(repo, a.cache_dir)
    g.prepare_worktree(repo, tree, params["bad"])
    kopts, bopts = options.parse_argv(params["options"])
    runner = SuiteStep(a.cache_dir, run_dir, kopts, bopts, tuple(params["suites"]), params["test_expr"],
                       count=len(state.data["steps"]))
    print(f"bisecting {params['good'][:12]}..{params['bad'][:12]} in {tree} (state: {state.path})")
    report = run_bisect(repo, tree, runner, state, runs=params["runs"], retries=params["retries"],
                        check_ends=a.check_ends and not a.resume)
    (run_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    print(f"\n{'step':<4} {'commit':<12} {'verdict':<7} {'seconds':>7}  subject")
    for i, s in enumerate(report.steps, 1):
        print(f"{i:<4} {s.rev[:12]:<12} {s.outcome:<7} {s.seconds:>7.1f}  {s.subject[:70]}")
    if report.first_bad:
        print(f"\nfirst bad commit: {report.first_bad} {report.subject}\n  {report.reason}")
        if report.excerpt:
            print("\n".join("  | " + line for line in report.excerpt.splitlines()[:20]))
    else:
        print(f"\n{report.reason}: {', '.join(c[:12] for c in report.candidates)}")
    print(f"run dir: {run_dir} (bisect.json, report.json, step-*/)")
    return ExitCode.PASS if report.first_bad else ExitCode.TEST_FAILURE


def cmd_doctor(a: argparse.Namespace) -> int:
    from harness import doctor

    results = doctor.checks(a.cache_dir)
    print(doctor.render(results))
    return ExitCode.PASS if all(c.ok for c in results) else ExitCode.USAGE


BOARD_FRAGMENT = "pkvm-el2-dump"


def cmd_build(a: argparse.Namespace) -> int:
    from harness.machine import MachineRequest

    kopts = options.kernel_options(a)
    if a.board and BOARD_FRAGMENT not in kopts.fragments:
        kopts = dataclasses.replace(kopts, fragments=[*kopts.fragments, BOARD_FRAGMENT])
    k = MachineRequest.check(kopts, options.BootOptions(), a.cache_dir, quiet=a.quiet, qemu=False).kernel()
    print(f"kernel {k.meta['version']} ({_how_built({'reused': k.reused, **k.meta})}): {k.dir}")
    if a.board:
        same = " ".join([f"--pkvm-kernel {a.kernel}"] * bool(a.kernel)
                        + [f"--pkvm-config {f}" for f in kopts.fragments]
                        + [f"--pkvm-patch {p}" for p in kopts.patches])
        print(f"install {k.dir / 'Image'} on the board (boot it with kvm-arm.mode=protected; everything is "
              "built in, no modules), then run the suites with the same kernel options:\n"
              f"  pytest test_suites/allocator test_suites/stage2 --pkvm-target ssh://root@BOARD {same}")
    return ExitCode.PASS


def _how_built(k: dict[str, Any]) -> str:
    if str(k.get("source", "")).startswith("prebuilt:"):
        return f"your build in {k['origin']}"
    return "reused from cache" if k["reused"] else f"built in {k['build_seconds']:.0f}s"


def cmd_test(a: argparse.Namespace) -> int:
    from harness.commands.test import available_suites, test

    suites = [s for s in a.suites.split(",") if s] or available_suites()
    return test(options.kernel_options(a), options.boot_options(a), a.cache_dir, a.runs_dir, suites,
                a.test_expr, quiet=a.quiet, verbose=a.verbose)


def cmd_rootfs(a: argparse.Namespace) -> int:
    from harness.image.initramfs import build_initramfs
    img = build_initramfs(a.cache_dir)
    print(f"initramfs {img.path} sha256 {img.sha256} from {', '.join(img.packages)}")
    return ExitCode.PASS


def cmd_run(a: argparse.Namespace) -> int:
    from harness.commands.run import run

    out = run(options.kernel_options(a), options.boot_options(a), a.cache_dir, a.runs_dir, quiet=a.quiet,
              interactive=a.command == "boot" and a.interactive)
    r = out.result
    if a.command == "run" and a.json:
        print((out.run_dir / "result.json").read_text(), end="")
        return out.exit_code
    k = r.get("kernel", {})
    b = r.get("boot", {})
    if k:
        print(f"kernel: Linux {k['version']} ({_how_built(k)}, key {k['cache_key']})")
    if b:
        def at(seconds: float | None) -> str:
            return f"{seconds}s" if seconds is not None else "never"
        print(f"boot:   -cpu {b['cpu']} -smp {b['smp']} -m {b['mem']}: pKVM {b['pkvm_mode'] or 'not up'}"
              f" at {at(b['seconds_to_pkvm'])}, shell at {at(b['seconds_to_ready'])}")
    print(f"result: {r['outcome'].upper()}: {r['reason']}")
    for event in r.get("events", [])[:1]:
        print(f"--- console around line {event['line_no']} ({event['kind']}) ---")
        print("\n".join(event["excerpt"][:30]))
    print(f"run dir: {out.run_dir}")
    return out.exit_code


def cmd_inspect(a: argparse.Namespace) -> int:
    from harness.commands.inspect_el2 import inspect_booted, render_text
    from harness.el2.snapshot import El2Reader

    if bool(a.qmp) != bool(a.vmlinux):
        raise UsageError("--qmp and --vmlinux go together", hint="give both to inspect a running QEMU, or neither")
    if a.qmp:
        for path, what in ((a.qmp, "--qmp socket"), (a.vmlinux, "--vmlinux")):
            if not path.exists():
                raise UsageError(f"{what} {path} does not exist", hint="point it at the running machine's files")
        with El2Reader(a.qmp, a.vmlinux, a.cache_dir) as reader:
            snap = reader.snapshot()
    else:
        snap = inspect_booted(options.kernel_options(a), options.boot_options(a), a.cache_dir, a.runs_dir,
                              before=a.run, quiet=a.quiet)
    checked = None
    if a.check:
        from harness.model.invariants import evaluate
        checked = evaluate(snap)
    if a.json:
        out = snap.to_dict()
        if checked is not None:
            out["model_rules"] = checked.rules.name
            out["model_rules_warning"] = checked.rules.warning
            out["invariants_ran"] = checked.ran
            out["invariants_not_applicable"] = checked.not_applicable
            out["findings"] = [f.__dict__ for f in checked.findings]
        print(json.dumps(out, indent=1))
    else:
        print(render_text(snap))
        if checked is not None:
            print(f"invariants: {checked.summary()}")
            for f in checked.findings:
                print(f"  {f}")
    if a.png:
        from harness.el2.picture import render
        render(snap, a.png)
        if not a.json:
            print(f"picture: {a.png}")
    return ExitCode.TEST_FAILURE if checked and checked.findings else ExitCode.PASS


def _print_replay(result, names_in_order: list[str] | None = None) -> int:
    print(f"{'pool':<22} operations")
    for pool, counts in result.per_pool.items():
        print(f"{pool:<22} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if result.dropped:
        print(f"dropped at VM teardown (reclaim_guest_pages): {', '.join(result.dropped)}")
    if result.divergence:
        print(result.divergence.render())
    for line in result.final_mismatches[:20]:
        print(f"final state differs: {line}")
    verdict = "PASS: 0 divergences" if result.ok else "FAIL: the kernel and the model disagree"
    print(f"replay: {result.ops} operations; {verdict}")
    return ExitCode.PASS if result.ok else ExitCode.TEST_FAILURE


def cmd_trace(a: argparse.Namespace) -> int:
    command = a.traced_command[1:] if a.traced_command[:1] == ["--"] else a.traced_command
    if not command:
        raise UsageError("no command to trace", hint="pkvm-harness trace -- /opt/pkvm-harness/bin/pkvm_guest --vms 2")
    from harness.commands.trace import trace_command

    out = trace_command(options.kernel_options(a), options.boot_options(a), a.cache_dir, a.runs_dir,
                        " ".join(command), timeout=a.timeout, quiet=a.quiet, packet_log=a.packet_log)
    if a.json:
        print((out.run_dir / "result.json").read_text(), end="")
        return ExitCode.PASS if out.replay.ok else ExitCode.TEST_FAILURE
    trace = out.trace
    print(f"traced `{' '.join(command)}`: {len(trace.ops)} allocator calls in {trace.seconds:.1f}s"
          f" ({trace.hits_ignored} hits outside EL2 ignored, {trace.steps_repeated} steps repeated)")
    code = _print_replay(out.replay)
    print(f"run dir: {out.run_dir} (trace.jsonl, snapshot-initial.json, snapshot-final.json)")
    return code


def cmd_inject(a: argparse.Namespace) -> int:
    from harness.commands.inject import InjectRequest, inject_command
    from harness.el2.inject import SITES, Plan

    command = a.workload_command[1:] if a.workload_command[:1] == ["--"] else a.workload_command
    if (a.site is None) != (a.nth is None):
        raise UsageError("--site and --nth go together", hint="pkvm-harness inject --site hyp_alloc_pages --nth 3")
    if a.sweep and a.site:
        raise UsageError("--sweep fails every call in turn: it takes no --site", hint="drop --site and --nth")
    if a.pool and not a.site:
        raise UsageError("--pool narrows --site's count", hint="add --site hyp_alloc_pages --nth N")
    if a.pool and not next(s for s in SITES if s.name == a.site).pool_arg:
        raise UsageError(f"{a.site} takes no pool: --pool counts only an allocator's calls",
                         hint="drop --pool, or use --site hyp_alloc_pages")
    req = InjectRequest(a.workload, a.vcpus, a.seed, " ".join(command) or None,
                        Plan(a.site, a.nth, a.pool) if a.site else None, a.sweep, a.limit)
    out = inject_command(options.kernel_options(a), options.boot_options(a), a.cache_dir, a.runs_dir, req,
                         quiet=a.quiet, progress=None if a.quiet or a.json else print)
    print((out.run_dir / "inject.json").read_text() if a.json else out.text, end="" if a.json else "\n")
    if not a.json:
        print(f"run dir: {out.run_dir} (inject.json, inject.md, console.log)")
    return out.code


def cmd_coverage(a: argparse.Namespace) -> int:
    from harness.report.run_coverage import el2_coverage, render

    out = el2_coverage(a.run_dir, a.out)
    print(json.dumps(out.to_dict(), indent=1) if a.json else render(out))
    return ExitCode.PASS


def cmd_replay(a: argparse.Namespace) -> int:
    from harness.replay import replay_saved

    result = replay_saved(a.trace)
    if a.json:
        from harness.report.evidence import divergence

        print(json.dumps({"operations": result.ops, "ok": result.ok, "per_pool": result.per_pool,
                          "dropped": result.dropped, "divergence": divergence(result)}, indent=1))
        return ExitCode.PASS if result.ok else ExitCode.TEST_FAILURE
    return _print_replay(result)


def cmd_report(a: argparse.Namespace) -> int:
    from harness.fsutil import atomic_write_text
    from harness.report import render

    runs = [render.load(d) for d in a.run_dirs]
    text = render.html(runs) if a.format == "html" else render.markdown(runs)
    if a.output:
        atomic_write_text(a.output, text)
        print(f"report: {a.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


COMMANDS = {"doctor": cmd_doctor, "build": cmd_build, "rootfs": cmd_rootfs, "run": cmd_run, "boot": cmd_run,
            "test": cmd_test,
            "inspect": cmd_inspect, "trace": cmd_trace, "inject": cmd_inject, "replay": cmd_replay,
            "coverage": cmd_coverage,
            "bisect": cmd_bisect, "report": cmd_report}


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so every `finally` and context manager stops what it started


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    # Started from a script's background job, SIGINT arrives ignored (and Python then installs no
    # handler); an interrupt must still stop QEMU and make cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return int(COMMANDS[args.command](args))
    except HarnessError as e:
        print(f"pkvm-harness: error: {e.one_line()}", file=sys.stderr)
        return int(e.exit_code)
    except KeyboardInterrupt:
        print("pkvm-harness: interrupted; QEMU and make were stopped", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:              # `pkvm-harness run --json | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitCode.PASS)


if __name__ == "__main__":
    sys.exit(main())
