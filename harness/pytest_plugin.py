"""pytest plugin (entry point `pytest11`): one set of suites, run against QEMU or a board.

  pytest test_suites/                                   QEMU, console transport (default)
  pytest test_suites/ --pkvm-transport ssh              QEMU, over SSH to dropbear in the guest
  pytest test_suites/ --pkvm-target ssh://root@board:22 --pkvm-ssh-key ~/.ssh/id_ed25519

Safe to have installed: every option is --pkvm-*, there is no autouse fixture, and nothing is
recorded until a test asks for the `target` fixture. From then on the session is a suite run: its
run directory gets result.json and junit.xml, each failing test its evidence, and a target that
dies is reported once, on the test it died in; later tests are not run.

Fixtures: `target` (session; booted once, closed at the end), `payload` (path of a guest program
on the target, uploaded to a board on first use), `el2` (an El2Reader, on targets with EL2 memory
access; skips elsewhere), `el2_trace`, `expected_pkvm_mode`, `kernel_version`, `kernel_config`, `seed`.
Markers: needs_el2, needs_qemu.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from harness import options
from harness.errors import HarnessError, session_exit_code
from harness.paths import default_runs_dir
from harness.report.recorder import PHASE_FAILED, PLUGIN_NAME, REPLAYS, SuiteRecorder
from harness.targets.base import Debugger, El2Memory, Target


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("pkvm-harness", "pKVM harness: the machine under test (kernel and boot options as for "
                        "`pkvm-harness run`, prefixed --pkvm-)")
    options.add_to_pytest(g)
    p = options.PLUGIN_PREFIX
    g.addoption(f"{p}target", default="qemu", help="qemu (default), or ssh://user@host:port for a board")
    g.addoption(f"{p}transport", choices=["console", "ssh"], default="console",
                help="how to drive a QEMU target (default: console)")
    g.addoption(f"{p}ssh-key", type=Path, default=None, help="private key for a board")
    g.addoption(f"{p}ssh-known-hosts", type=Path, default=Path("~/.ssh/known_hosts").expanduser(),
                help="known_hosts for a board (default: ~/.ssh/known_hosts)")
    g.addoption(f"{p}ssh-accept-new-host-key", action="store_true",
                help="accept and save an unknown or changed board host key")
    g.addoption(f"{p}run-dir", type=Path, default=None,
                help="where the run's console logs and results go (default: runs/<time>-pytest)")
    g.addoption(f"{p}el2-coverage", action="store_true",
                help="write the session's EL2 line and function coverage (el2trace's block counts) to "
                     "RUN_DIR/el2-coverage: lcov .info, HTML, summary.json; figures in result.json")
    g.addoption(f"{p}seed", type=int, default=None,
                help="seed for the randomized workloads (default: a new one, printed in each test's report)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_el2: reads EL2 memory (QEMU, or a board whose kernel has the EL2 dump)")
    config.addinivalue_line("markers", "needs_qemu: needs a QEMU target")
    config.pluginmanager.register(SuiteRecorder(config), PLUGIN_NAME)


def _opt(config: pytest.Config, name: str) -> Any:
    return config.getoption(options.PLUGIN_PREFIX + name)


def _is_qemu(config: pytest.Config) -> bool:
    return _opt(config, "target") == "qemu"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # needs_el2: the test gets the `el2` fixture, which skips where EL2 memory cannot be read
    for item in items:
        names = getattr(item, "fixturenames", None)
        if item.get_closest_marker("needs_el2") and names is not None and "el2" not in names:
            names.append("el2")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if not _is_qemu(item.config) and item.get_closest_marker("needs_qemu"):
        pytest.skip(f"needs_qemu: the target is {_opt(item.config, 'target')}, not QEMU")


def _recorder(config: pytest.Config) -> SuiteRecorder:
    recorder = config.pluginmanager.get_plugin(PLUGIN_NAME)
    assert isinstance(recorder, SuiteRecorder)
    return recorder


@pytest.fixture(scope="session")
def pkvm_run_dir(request: pytest.FixtureRequest) -> Path:
    run_dir = _opt(request.config, "run-dir")
    if run_dir is None:
        run_dir = default_runs_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-pytest"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


@pytest.fixture(scope="session")
def pkvm_machine(request: pytest.FixtureRequest, pkvm_run_dir: Path) -> Any:
    """The assembled QEMU machine (kernel, payloads, image, spec), or None for a board."""
    if not _is_qemu(request.config):
        return None
    from harness.machine import MachineRequest, assemble

    recorder = _recorder(request.config)
    kopts, bopts, cache = options.from_pytest(request.config)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    # A cold build takes minutes: its progress reaches the terminal (a live line) or CI's log
    # (plain lines); a cached kernel prints nothing.
    try:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            # A gdbstub socket costs nothing until a tracer connects (the allocator suites trace).
            machine = assemble(MachineRequest.check(kopts, bopts, cache), pkvm_run_dir, gdb=True)
    except HarnessError as e:
        recorder.attach(pkvm_run_dir)
        _stop_session(recorder, e)
    recorder.kernel = machine.kernel
    return machine


def _stop_session(recorder: SuiteRecorder, e: HarnessError) -> NoReturn:
    recorder.reason = f"target not usable: {e.one_line()}"
    pytest.exit(f"pkvm-harness: {recorder.reason}", returncode=session_exit_code(e.exit_code))


@pytest.fixture(scope="session")
def target(request: pytest.FixtureRequest, pkvm_run_dir: Path, pkvm_machine: Any) -> Iterator[Target]:
    """The machine under test, booted (QEMU) or connected (board) once per session."""
    recorder = _recorder(request.config)
    recorder.attach(pkvm_run_dir)            # result.json is written even if the target never comes up
    try:
        t = pkvm_machine.start(pkvm_run_dir, _opt(request.config, "transport")) if pkvm_machine is not None \
            else _board(request.config)
    except HarnessError as e:
        _stop_session(recorder, e)
    recorder.target = t
    if pkvm_machine is not None and pkvm_machine.spec.plugin is not None:
        from harness.replay import LiveReplay

        recorder.live = LiveReplay(pkvm_machine.spec.plugin[2])
    yield t
    t.close()
    recorder.close_live()


def _board(config: pytest.Config) -> Target:
    from harness.targets.ssh import SshParams, SshTarget

    user, host, port = SshTarget.parse_url(_opt(config, "target"))
    return SshTarget(SshParams(host=host, port=port, user=user, key=_opt(config, "ssh-key"),
                               known_hosts=_opt(config, "ssh-known-hosts"),
                               accept_new_host_key=_opt(config, "ssh-accept-new-host-key")))


@pytest.fixture(scope="session")
def payload(target: Target, pkvm_machine: Any, request: pytest.FixtureRequest) -> Callable[[str], str]:
    """payload("kvm_caps") -> path on the target. Baked into the QEMU image; uploaded to a board
    (into its scratch directory) the first time, and again only if the local build changed."""
    from harness.image.payloads import GUEST_DIR

    if pkvm_machine is not None:                # QEMU: already in the initramfs
        return lambda name: f"{GUEST_DIR}/{name}"
    return _BoardPayloads(target, request.config)


class _BoardPayloads:
    def __init__(self, target: Any, config: pytest.Config) -> None:
        self.target = target
        self.config = config
        self.payloads: Any = None

    def __call__(self, name: str) -> str:
        if self.payloads is None:
            self.payloads = _board_payload_build(self.config)
        local = self.payloads.path(name)
        remote = f"{self.target.scratch}/bin/{name}"
        digest = hashlib.sha256(local.read_bytes()).hexdigest()
        have = self.target.run(f"sha256sum {remote} 2>/dev/null").stdout.split()[:1]
        if have != [digest]:
            self.target.run(f"mkdir -p $(dirname {remote})").check()
            self.target.put(local, remote)
        return remote


def _board_payload_build(config: pytest.Config) -> Any:
    """The guest programs, built from the kernel source the options name (KVM selftests come from it)."""
    from harness.image.payloads import build_payloads
    from harness.kernel.build import build
    from harness.machine import build_request

    kopts, _, cache = options.from_pytest(config)
    req = build_request(kopts, cache, quiet=True)
    return build_payloads(req, build(req))


@pytest.fixture(scope="session")
def el2(target: Target, request: pytest.FixtureRequest) -> Iterator[Any]:
    """An El2Reader on the target (snapshots, physical reads, symbols): over QMP on QEMU; through
    the kernel's EL2 dump file on a board (a test kernel built with `pkvm-harness build --board`),
    decoded with the vmlinux the kernel options name, which must be the one the board runs.
    Skips where neither is there."""
    from harness.el2.snapshot import El2Reader

    cache = options.from_pytest(request.config)[2]
    if isinstance(target, El2Memory):
        reader = El2Reader(target.qmp_socket, target.vmlinux, cache)
    else:
        reader = _board_el2(target, request.config, cache)
    yield reader
    with contextlib.suppress(Exception):     # a dead target's QMP is gone: it was reported where it died
        reader.close()


def _board_el2(target: Target, config: pytest.Config, cache: Path) -> Any:
    from harness.el2.dump import DumpMemory, check_vmlinux
    from harness.el2.snapshot import El2Reader

    if not DumpMemory.present(target):
        pytest.skip(f"EL2 memory cannot be read on {target.name}: its kernel has no EL2 dump "
                    "(build one with `pkvm-harness build --board`: docs/boards.md)")
    try:
        vmlinux = _board_vmlinux(config)
        check_vmlinux(target, vmlinux, cache)
    except HarnessError as e:
        _stop_session(_recorder(config), e)
    return El2Reader(DumpMemory(target, getattr(target, "scratch", "/tmp")), vmlinux, cache)


def _board_vmlinux(config: pytest.Config) -> Path:
    """The vmlinux of the kernel the options name: --pkvm-kernel-build's, or the harness's build."""
    from harness.kernel.build import build
    from harness.machine import build_request

    kopts, _, cache = options.from_pytest(config)
    if kopts.kernel_build is not None:
        return Path(kopts.kernel_build) / "vmlinux"
    return build(build_request(kopts, cache, quiet=True)).vmlinux


def _has_el2(target: Target) -> bool:
    if isinstance(target, El2Memory):
        return True
    from harness.el2.dump import DumpMemory

    return DumpMemory.present(target)


@pytest.fixture(scope="session")
def kernel_version(target: Target) -> Any:
    """The running kernel's version (uname -r): on a board as on QEMU."""
    from harness.kernel.version import KernelVersion

    return KernelVersion.parse(target.run("uname -r").check().stdout)


@pytest.fixture(scope="session")
def kernel_config(target: Target, pkvm_machine: Any) -> dict[str, str] | None:
    """The running kernel's .config as {NAME: value}: the build's on QEMU, /proc/config.gz on a
    board that has it, else None."""
    from harness.kernel.config import parse_dotconfig

    if pkvm_machine is not None:
        return parse_dotconfig(pkvm_machine.kernel.config.read_text())
    r = target.run("zcat /proc/config.gz 2>/dev/null")
    return parse_dotconfig(r.stdout) if r.ok and r.stdout.strip() else None


@pytest.fixture(scope="session")
def expected_pkvm_mode(request: pytest.FixtureRequest, target: Target, pkvm_machine: Any) -> str | None:
    """--pkvm-expect-mode, else what the QEMU CPU and the kernel give (6.1 has no hVHE), else None."""
    from harness.targets.qemu import expected_pkvm_mode as expected

    given = _opt(request.config, "expect-mode")
    if given:
        return str(given)
    if pkvm_machine is None:
        return None
    return expected(pkvm_machine.spec.cpu, pkvm_machine.kernel.image)


@pytest.fixture
def harness_gap(request: pytest.FixtureRequest) -> Callable[[bool, str], None]:
    """harness_gap(applies, why): on this kernel the harness itself cannot judge the test yet
    (its model lacks a newer kernel's rules). The test still runs and is reported as xfail with
    `why`; strict, so the day it passes it fails, saying the gap has closed."""
    def mark(applies: bool, why: str) -> None:
        if applies:
            request.applymarker(pytest.mark.xfail(strict=True, reason=f"harness gap: {why}"))
    return mark


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The randomized workloads' seed: --pkvm-seed, or a new one. It is printed and kept in the
    test report, so a failing run can be replayed with --pkvm-seed."""
    value = _opt(request.config, "seed")
    if value is None:
        value = random.SystemRandom().randrange(1 << 32)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value} (replay with --pkvm-seed {value})")
    return int(value)


@pytest.fixture
def el2_leak(request: pytest.FixtureRequest, el2: Any) -> Callable[[Any, Any, str], str]:
    """el2_leak(before, after, pool) -> the pages `pool` holds in `after` and not in `before`, one
    line each: what the kernel uses it for (from `after`) and, with el2trace, the call that
    allocated it. For a baseline assertion's message."""
    from harness.model import leaks

    live = _recorder(request.config).live

    def describe(before: Any, after: Any, pool: str) -> str:
        if live is not None:
            live.poll()
        pages = leaks.held(after.pools[pool]) - leaks.held(before.pools[pool])
        lines = leaks.describe(pages, after, live.allocated_by if live is not None else None,
                               live.replayer.names if live is not None else None)
        return f"{pool} holds {len(pages)} page(s) it did not before:\n  " + "\n  ".join(lines)

    return describe


@pytest.fixture
def el2_clean_after(request: pytest.FixtureRequest, target: Target) -> Iterator[None]:
    """After the test: the kernel log since it began has no WARN, BUG, oops or EL2 panic, and (where
    EL2 memory can be read) every invariant holds on a fresh snapshot; with el2trace, every
    host/hyp page-state transition the test made was the model's (harness.model.transitions).
    The EL2 suites take it for every test (their conftest); a finding fails the test (at its
    teardown), with the lines or findings. A test that already failed is not judged again, but
    its transitions are. The time it takes goes to result.json (el2trace.after_test_checks)."""
    el2 = request.getfixturevalue("el2") if _has_el2(target) else None
    oracle = _transition_oracle(request.config, target, el2)
    paused = getattr(oracle, "poll", None)
    if oracle is not None and el2 is not None and oracle.transitions.states is None:
        try:                                  # the model starts here
            before = oracle.check_transitions(el2.snapshot(while_paused=paused))
        except ValueError as e:               # not seeded: the next test tries again
            before = [f"the page states could not be read to start from: {e}"]
        if before:                            # calls since power-on that went wrong (a VM's teardown, say)
            pytest.fail("page-state transitions before this test:\n" + "\n".join(f"[transitions] {t}" for t in before))
    mark = target.dmesg_mark()
    yield
    if target.death() is not None:
        return
    started = time.monotonic()
    try:
        _judge_after_test(target, mark, el2, oracle, getattr(request.node, "stash", {}).get(PHASE_FAILED, False))
    finally:
        recorder = _recorder(request.config)
        recorder.after_checks = (recorder.after_checks[0] + 1, recorder.after_checks[1] + time.monotonic() - started)


def _judge_after_test(target: Target, mark: Any, el2: Any, oracle: Any, failed: bool) -> None:
    """The kernel log since `mark`, the invariants on a fresh snapshot, and with a transition
    oracle (el2trace's, or a board's ring) the transitions since the last check, all reported
    together. After a failed test only the transitions: they are this test's evidence (an error
    at its teardown), not the next test's."""
    from harness.model.invariants import render, run_checks
    from harness.verdict import clean, scan

    messages = []
    if not failed and (events := scan(clean(target.dmesg(mark)))):
        messages.append("the kernel log during this test:\n" + "\n".join(f"{e.kind}: {e.line}" for e in events))
    if el2 is not None:
        snap = el2.snapshot(while_paused=getattr(oracle, "poll", None))
        if not failed and (findings := render(run_checks(snap))):
            messages.append("invariants broken after this test:\n" + findings)
        if oracle is not None:
            try:
                transitions = oracle.check_transitions(snap)
            except ValueError as e:
                transitions = [f"the page states could not be compared: {e}"]
            if transitions:
                messages.append("page-state transitions during this test:\n"
                                + "\n".join(f"[transitions] {t}" for t in transitions))
    if messages:
        pytest.fail("\n".join(messages))


@pytest.fixture
def el2_transitions(request: pytest.FixtureRequest, el2: Any) -> Callable[[], Any]:
    """el2_transitions() -> (the TransitionChecker, its findings against a fresh snapshot): every
    host/hyp page-state transition since the last check, judged (harness.model.transitions).
    Skips without el2trace or a board's ring."""
    oracle = _transition_oracle(request.config, request.getfixturevalue("target"), el2)
    if oracle is None:
        pytest.skip("the transitions are traced by el2trace (QEMU 9.1+ with --el2-plugin) or a dump "
                    "kernel's ring (a board)")

    def check() -> Any:
        snap = el2.snapshot(while_paused=getattr(oracle, "poll", None))
        return oracle.transitions, oracle.check_transitions(snap)

    return check


RING_TRANSITIONS = pytest.StashKey[Any]()  # session: a board's transition oracle (harness.el2.ring_transitions)


def _transition_oracle(config: pytest.Config, target: Target, el2: Any) -> Any:
    """What judges each host/hyp transition: el2trace's live replay on QEMU, a board's ring
    (harness.el2.ring_transitions) over SSH; None for neither (a gdbstub-only QEMU)."""
    from harness.el2.dump import DumpMemory
    from harness.el2.ring_transitions import RingTransitions

    if el2 is None:
        return None
    if (live := _recorder(config).live) is not None:
        return live
    if isinstance(target, Debugger) or not isinstance(el2.mem, DumpMemory) or not RingTransitions.available(el2):
        return None
    oracle = config.stash.get(RING_TRANSITIONS, None)
    if oracle is None or oracle.reader is not el2:
        oracle = config.stash[RING_TRANSITIONS] = RingTransitions(el2)
    return oracle


@pytest.fixture
def el2_inject(target: Target, el2: Any) -> Callable[..., Any]:
    """el2_inject(site=None, nth=None, pool=None) -> a context manager that counts every call of
    the EL2 allocation sites while its block runs and, given a site and N, fails that call
    (harness.el2.inject: hyp_alloc_pages NULL, refill_memcache -ENOMEM, admit_host_page NULL);
    on leaving, `.result` holds the Injection (the calls, the one failed). Through the gdbstub:
    skips on targets without one. A panic it causes ends the session's target, as any does."""
    from harness.el2.inject import Injector, Plan

    if not isinstance(target, Debugger):
        pytest.skip(f"{target.name} has no gdbstub to fail EL2 allocations through")

    @contextlib.contextmanager
    def window(site: str | None = None, nth: int | None = None, pool: str | None = None) -> Iterator[Any]:
        if (site is None) != (nth is None):
            raise ValueError("el2_inject(site, nth): give both to fail a call, neither to count")
        box = types.SimpleNamespace(result=None)
        injector = Injector(el2, target.gdb_socket, Plan(site, nth, pool) if site and nth else None)
        with injector:
            yield box
            box.result = injector.stop()

    return window


RING_HISTORY = pytest.StashKey[Any]()      # session: a board's every EL2 allocator call since boot (harness.el2.ring)


@pytest.fixture
def el2_trace(request: pytest.FixtureRequest, target: Target, el2: Any) -> Callable[[], Any]:
    """el2_trace() -> a context manager that traces every EL2 allocator call while its block runs;
    on leaving, `.result` holds the replay against the model (harness.model.replay.ReplayResult),
    its pools compared with a snapshot at the end. With el2trace (QEMU 9.1+) the window is a slice
    of the replay from power-on; without it, a gdbstub trace replayed from a snapshot at its start;
    on a board (a dump kernel over SSH), its event ring, replayed from power-on while the ring
    holds every call since, else from a snapshot at the start."""
    from harness.el2.dump import DumpMemory
    from harness.el2.ring import RingHistory, RingTracer

    live = _recorder(request.config).live
    board = live is None and not isinstance(target, Debugger) and isinstance(el2.mem, DumpMemory)
    # a board's own record of the calls: the dump kernel's ring, ordered by one lock on every CPU
    # (the 7.x trace remote merges its per-CPU buffers by timestamp: tests/integration checks it)
    board_tracer = (lambda: RingTracer(el2, request.config.stash.setdefault(RING_HISTORY, RingHistory()))) \
        if board and RingTracer.available(el2) else None
    if live is None and not isinstance(target, Debugger) and board_tracer is None:
        pytest.skip(f"{target.name} has neither el2trace, a gdbstub, nor a dump kernel's record of the EL2 "
                    "allocator's calls to trace through")

    @contextlib.contextmanager
    def plugin_window() -> Iterator[Any]:
        from harness.el2.trace import Trace

        box = types.SimpleNamespace(trace=None, result=None)
        request.node.stash.setdefault(REPLAYS, []).append(box)   # a failing test's report shows its divergence
        start = el2.snapshot(while_paused=live.poll)
        before = live.compare(start)                              # pools of VMs gone since are dropped here
        if before or live.differed_in is not None:   # the window could not be judged: said once, then skipped
            if live.differed_in is not None:
                pytest.skip(f"the replay has differed from the kernel's pools since {live.differed_in}")
            live.differed_in = request.node.nodeid
            pytest.fail("the replay's pools differ from the kernel's before this window began:\n  "
                        + "\n  ".join(before[:10]))
        mark, started, live.ops = live.mark(), time.monotonic(), []
        try:
            yield box
            end = el2.snapshot(while_paused=live.poll)
        finally:
            ops, live.ops = live.ops or [], None
        # .trace: the window's calls between two snapshots, as a gdbstub window gives them
        box.trace = Trace(ops, start, end, live.calls.coverage.probe_hits_not_at_el2, time.monotonic() - started)
        box.result = live.since(mark, end)

    @contextlib.contextmanager
    def gdbstub_window() -> Iterator[Any]:
        from harness.el2.trace import Tracer
        from harness.replay import replay_trace

        assert isinstance(target, Debugger)
        box = types.SimpleNamespace(trace=None, result=None)
        request.node.stash.setdefault(REPLAYS, []).append(box)
        with Tracer(el2, target.gdb_socket) as tracer:
            tracer.start()
            yield box
            box.trace = tracer.stop()
        box.result = replay_trace(box.trace)

    @contextlib.contextmanager
    def board_window() -> Iterator[Any]:
        from harness.replay import replay_trace, replay_window

        assert board_tracer is not None
        box = types.SimpleNamespace(trace=None, result=None)
        request.node.stash.setdefault(REPLAYS, []).append(box)
        tracer = board_tracer()
        tracer.start()
        yield box
        box.trace = tracer.stop()
        # the ring's calls from power-on, while it holds them all: the model knows every free list's order
        boot = tracer.from_boot()
        sliced, before = replay_window(boot, box.trace) if boot is not None else (None, [])
        box.result = sliced if sliced is not None and not before else replay_trace(box.trace)
        if before and tracer.history is not None:   # said once; later windows replay from their first snapshot
            tracer.history.lost = f"the replay from power-on differed from the kernel before {request.node.nodeid}"
            pytest.fail("the replay from power-on differs from the kernel's pools before this window began:\n  "
                        + "\n  ".join(before[:10]))

    return plugin_window if live is not None else board_window if board_tracer is not None else gdbstub_window
