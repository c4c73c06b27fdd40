"""pytest plugin (entry point `pytest11`): one set of suites, run against QEMU or a board.

  pytest test_suites/                          QEMU, console transport (default)
  pytest test_suites/ --transport ssh          QEMU, over SSH to dropbear in the guest
  pytest test_suites/ --target ssh://root@board:22 --ssh-key ~/.ssh/id_ed25519

Fixtures: `target` (session; booted once, closed at the end), `payload` (path of a guest
program on the target, uploaded to a board on first use), `el2` (QEMU only: an El2Reader for
snapshots, physical reads and symbols; skips elsewhere). Markers: needs_el2, needs_qemu, slow.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
import types
from dataclasses import replace
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.paths import default_cache_dir, default_runs_dir
from harness.report.recorder import CALL_REPORT, PLUGIN_NAME, REPLAYS, EvidenceWatch, SuiteRecorder, evidence_dir


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("pkvm-harness", "pKVM target selection")
    g.addoption("--target", default="qemu", help="qemu (default), or ssh://user@host:port for a board")
    g.addoption("--transport", choices=["console", "ssh"], default="console",
                help="how to drive a QEMU target (default: console)")
    g.addoption("--cpu", default="max", help="QEMU -cpu (max: hVHE, cortex-a72: nVHE)")
    g.addoption("--smp", type=int, default=2, help="QEMU vCPUs")
    g.addoption("--mem", default="1024", help="QEMU memory")
    g.addoption("--kernel-src", type=Path, default=None, help="kernel tree or tarball (default: Debian 6.12)")
    g.addoption("--kernel", default=None, choices=["6.12", "6.1"], dest="pkvm_kernel",
                help="Debian's linux-source-X.Y (6.12 default, 6.1 LTS)")
    g.addoption("--config", action="append", default=[], dest="pkvm_fragments",
                help="extra kernel config fragment (repeatable)")
    g.addoption("--kconfig", action="append", default=[], dest="pkvm_kconfig", help="extra CONFIG_X=y")
    g.addoption("--patch", action="append", default=[], type=Path, dest="pkvm_patches",
                help="patch applied to a copy of the kernel source (repeatable)")
    g.addoption("--ssh-key", type=Path, default=None, help="private key for a board")
    g.addoption("--ssh-known-hosts", type=Path, default=Path("~/.ssh/known_hosts").expanduser(),
                help="known_hosts for a board (default: ~/.ssh/known_hosts)")
    g.addoption("--ssh-accept-new-host-key", action="store_true",
                help="accept and save an unknown or changed board host key")
    g.addoption("--run-dir", type=Path, default=None,
                help="where the target's console logs go (default: runs/<time>-pytest)")
    g.addoption("--boot-timeout", type=float, default=120.0, help="QEMU boot deadline")
    g.addoption("--expect-mode", choices=["nVHE", "hVHE"], default=None,
                help="the pKVM mode the boot suite demands (default on QEMU: from --cpu; on a board: either)")
    g.addoption("--seed", type=int, default=None,
                help="seed for the randomized workloads (default: a new one, printed in each test's report)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_el2: reads EL2 memory (QEMU targets only)")
    config.addinivalue_line("markers", "needs_qemu: needs a QEMU target")
    config.addinivalue_line("markers", "slow: takes minutes")
    config.pluginmanager.register(SuiteRecorder(config), PLUGIN_NAME)


def _is_qemu(config: pytest.Config) -> bool:
    return config.getoption("--target") == "qemu"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if not _is_qemu(item.config):
        for marker in ("needs_qemu", "needs_el2"):
            if item.get_closest_marker(marker):
                pytest.skip(f"{marker}: the target is {item.config.getoption('--target')}, not QEMU")


@pytest.fixture(scope="session")
def pkvm_run_dir(request: pytest.FixtureRequest) -> Path:
    run_dir = request.config.getoption("--run-dir")
    if run_dir is None:
        run_dir = default_runs_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-pytest"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


@pytest.fixture(scope="session")
def target(request: pytest.FixtureRequest, pkvm_run_dir: Path):
    """The machine under test, booted (QEMU) or connected (board) once per session."""
    recorder = request.config.pluginmanager.get_plugin(PLUGIN_NAME)
    recorder.attach(pkvm_run_dir)            # result.json is written even if the target never comes up
    try:
        t = _make_qemu_target(request.config, pkvm_run_dir) if _is_qemu(request.config) \
            else _make_board_target(request.config)
    except HarnessError as e:
        recorder.reason = f"target not usable: {e.one_line()}"
        pytest.exit(f"pkvm-harness: {recorder.reason}", returncode=int(e.exit_code))
    recorder.target = t
    yield t
    t.close()


def _make_qemu_target(config: pytest.Config, run_dir: Path):
    from harness import pipeline
    from harness.image.initramfs import build_initramfs
    from harness.image.keys import ensure_keys
    from harness.image.payloads import build_payloads
    from harness.kernel.build import build
    from harness.targets.qemu import socket_path
    from harness.targets.qemu_target import QemuTarget

    cache = default_cache_dir()
    kopts = pipeline.KernelOptions(kernel_src=config.getoption("--kernel-src"),
                                   kernel=config.getoption("pkvm_kernel"),
                                   fragments=config.getoption("pkvm_fragments"),
                                   kconfig=config.getoption("pkvm_kconfig"),
                                   patches=config.getoption("pkvm_patches"))
    capture = config.pluginmanager.getplugin("capturemanager")
    # A cold build takes minutes: its progress reaches the terminal (a live line) or CI's log
    # (plain lines); a cached kernel prints nothing.
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        req = pipeline.build_request(kopts, cache)
        kernel = build(req)
        payloads = build_payloads(req, kernel)
        initramfs = build_initramfs(cache, payloads)
    bopts = pipeline.BootOptions(cpu=config.getoption("--cpu"), smp=config.getoption("--smp"),
                                 mem=config.getoption("--mem"))
    # A gdbstub socket costs nothing until a tracer connects (the allocator suites trace).
    spec = replace(pipeline.qemu_spec(bopts, kernel, initramfs, run_dir), gdb_socket=socket_path(run_dir, "gdb.sock"))
    t = QemuTarget(spec, run_dir, transport=config.getoption("--transport"), keys=ensure_keys(cache),
                   boot_timeout=config.getoption("--boot-timeout"))
    t.kernel = kernel        # the el2 fixture reads its vmlinux
    t.payloads = payloads
    return t


def _make_board_target(config: pytest.Config):
    from harness.targets.ssh import SshParams, SshTarget

    user, host, port = SshTarget.parse_url(config.getoption("--target"))
    params = SshParams(host=host, port=port, user=user, key=config.getoption("--ssh-key"),
                       known_hosts=config.getoption("--ssh-known-hosts"),
                       accept_new_host_key=config.getoption("--ssh-accept-new-host-key"))
    return SshTarget(params)


@pytest.fixture(autouse=True)
def _pkvm_failure_evidence(request: pytest.FixtureRequest):
    """For a test on the target: if it fails, the console while it ran, the EL2 snapshot diff
    across it, a pool picture and the first divergence of its traces go into result.json."""
    if "target" not in request.fixturenames:
        yield
        return
    target = request.getfixturevalue("target")
    el2 = request.getfixturevalue("el2") if "el2" in request.fixturenames else None
    recorder = request.config.pluginmanager.get_plugin(PLUGIN_NAME)
    watch = EvidenceWatch(target, el2, evidence_dir(recorder.run_dir, request.node.nodeid))
    request.node.stash[REPLAYS] = []
    yield
    report = request.node.stash.get(CALL_REPORT, None)
    if report is not None and report.failed:
        recorder.add_evidence(request.node.nodeid, watch.collect(request.node.stash[REPLAYS]))


@pytest.fixture(scope="session")
def payload(target):
    """payload("kvm_caps") -> path on the target. Baked into the QEMU image; uploaded to a board
    (into its scratch directory) the first time, and again only if the local build changed."""
    from harness.image.payloads import GUEST_DIR

    local = getattr(target, "payloads", None)
    if local is not None:                       # QEMU: already in the initramfs
        return lambda name: f"{GUEST_DIR}/{name}"
    return _BoardPayloads(target)


class _BoardPayloads:
    def __init__(self, target) -> None:
        self.target = target
        self.payloads = None

    def __call__(self, name: str) -> str:
        if self.payloads is None:
            self.payloads = _board_payload_build()
        local = self.payloads.path(name)
        remote = f"{self.target.scratch}/bin/{name}"
        digest = hashlib.sha256(local.read_bytes()).hexdigest()
        have = self.target.run(f"sha256sum {remote} 2>/dev/null").stdout.split()[:1]
        if have != [digest]:
            self.target.run(f"mkdir -p $(dirname {remote})").check()
            self.target.put(local, remote)
        return remote


def _board_payload_build():
    from harness import pipeline
    from harness.image.payloads import build_payloads
    from harness.kernel.build import build

    req = pipeline.build_request(pipeline.KernelOptions(), default_cache_dir(), quiet=True)
    return build_payloads(req, build(req))


@pytest.fixture(scope="session")
def el2(target):
    """An El2Reader on the target (snapshots, physical reads, symbols); skips off QEMU."""
    from harness.el2.snapshot import El2Reader

    qmp = getattr(target, "qmp_socket", None)
    kernel = getattr(target, "kernel", None)
    if qmp is None or kernel is None:
        pytest.skip(f"EL2 memory cannot be read on {target.name}: only QEMU targets expose physical "
                    "memory (QMP)")
    reader = El2Reader(qmp, kernel.vmlinux, default_cache_dir())
    yield reader
    reader.close()


@pytest.fixture(scope="session")
def expected_pkvm_mode(request: pytest.FixtureRequest, target) -> str | None:
    """--expect-mode, else what the QEMU CPU and the kernel give (6.1 has no hVHE), else None."""
    from harness.targets.qemu import expected_pkvm_mode as expected

    given = request.config.getoption("--expect-mode")
    if given:
        return given
    spec, kernel = getattr(target, "spec", None), getattr(target, "kernel", None)
    return expected(spec.cpu, kernel.image) if spec is not None and kernel is not None else None


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The randomized workloads' seed: --seed, or a new one. It is printed and kept in the test
    report, so a failing run can be replayed with --seed."""
    value = request.config.getoption("--seed")
    if value is None:
        value = random.SystemRandom().randrange(1 << 32)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value} (replay with --seed {value})")
    return value


@pytest.fixture
def el2_trace(request: pytest.FixtureRequest, target, el2):
    """el2_trace() -> a context manager that traces every EL2 allocator call while its block runs;
    on leaving, `.result` holds the replay against the model (harness.model.replay.ReplayResult)."""
    from harness.el2.trace import Tracer

    gdb = getattr(getattr(target, "spec", None), "gdb_socket", None)
    if gdb is None:
        pytest.skip(f"{target.name} has no gdbstub to trace through")

    @contextlib.contextmanager
    def session():
        from harness.pipeline import replay_trace

        box = types.SimpleNamespace(trace=None, result=None)
        request.node.stash.setdefault(REPLAYS, []).append(box)   # a failing test's report shows its divergence
        with Tracer(el2, gdb) as tracer:
            tracer.start()
            yield box
            box.trace = tracer.stop()
        box.result = replay_trace(box.trace)

    return session
