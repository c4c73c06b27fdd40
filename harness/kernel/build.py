"""Configure and build an arm64 pKVM kernel with O=, and cache the artifacts.

Cache layout under the cache directory:
  build/<tree-id>/      kbuild output dir (O=) per source tree, reused so rebuilds are incremental
  kernels/<key>/        finished artifacts: Image, vmlinux, System.map, config, build.log, meta.json
A kernels/<key> entry appears by an atomic rename only after a successful build, so an
interrupted build never leaves an entry a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import BuildError, UsageError
from harness.fsutil import atomic_dir, file_lock
from harness.kernel import config as kconfig
from harness.kernel.source import KernelSource
from harness.procs import GroupGuard, die_with_parent
from harness.progress import Progress

# Bump when the way a config is produced changes, so old cache entries are not reused.
KEY_SCHEMA = 1
ARTIFACTS = {"Image": "arch/arm64/boot/Image", "vmlinux": "vmlinux", "System.map": "System.map",
             "config": ".config"}


@dataclass(frozen=True)
class BuildRequest:
    source: KernelSource
    requested: dict[str, kconfig.ConfigOption]
    cache_dir: Path
    cross_compile: str = "aarch64-linux-gnu-"
    jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    timeout: float = 3600.0
    quiet: bool = False


@dataclass(frozen=True)
class KernelArtifacts:
    key: str
    dir: Path
    meta: dict
    reused: bool

    @property
    def image(self) -> Path:
        return self.dir / "Image"

    @property
    def vmlinux(self) -> Path:
        return self.dir / "vmlinux"

    @property
    def system_map(self) -> Path:
        return self.dir / "System.map"

    @property
    def config(self) -> Path:
        return self.dir / "config"

    @property
    def build_log(self) -> Path:
        return self.dir / "build.log"


def compiler_version(cross_compile: str) -> str:
    gcc = f"{cross_compile}gcc"
    if shutil.which(gcc) is None:
        raise UsageError(f"cross compiler {gcc} not found",
                         hint="run `make setup` (installs gcc-aarch64-linux-gnu) or pass --cross-compile PREFIX")
    out = subprocess.run([gcc, "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0].strip()


def cache_key(source_identity: str, fragment: str, compiler: str) -> str:
    blob = json.dumps({"schema": KEY_SCHEMA, "arch": "arm64", "source": source_identity,
                       "config": fragment, "compiler": compiler}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def work_dir_for(req: BuildRequest) -> Path:
    """One O= directory per source tree: kbuild rebuilds only what a source or config change
    touches, so config tweaks and bisect steps stay incremental."""
    wid = hashlib.sha256(str(req.source.tree).encode()).hexdigest()[:16]
    return req.cache_dir / "build" / wid


def lookup(req: BuildRequest) -> tuple[str, Path, str]:
    compiler = compiler_version(req.cross_compile)
    fragment = kconfig.fragment_text(req.requested)
    key = cache_key(req.source.identity, fragment, compiler)
    return key, req.cache_dir / "kernels" / key, compiler


def build(req: BuildRequest) -> KernelArtifacts:
    """Return cached artifacts for the request, building them first if needed."""
    key, entry, compiler = lookup(req)
    if (entry / "meta.json").is_file():
        return KernelArtifacts(key, entry, json.loads((entry / "meta.json").read_text()), reused=True)

    # Everything that can be judged without building is judged first.
    symbols = kconfig.kconfig_symbols(req.source.tree)
    for name in req.source.added_symbols:      # a patch's own symbol, before the patch is in the tree
        symbols.setdefault(name, kconfig.KconfigSymbol(name, "a patch", []))
    kconfig.check_known(req.requested, symbols)
    kconfig.check_combinations({o.name: o.value for o in req.requested.values()}, explicit_only=True)

    fragment = kconfig.fragment_text(req.requested)
    work = work_dir_for(req)
    with file_lock(work.with_name(work.name + ".lock")):
        if (entry / "meta.json").is_file():  # another run built it while we waited
            return KernelArtifacts(key, entry, json.loads((entry / "meta.json").read_text()), reused=True)
        if req.source.checkout is not None:
            req.source.checkout()
        work.mkdir(parents=True, exist_ok=True)
        log = work / "build.log"
        cold = not (work / "vmlinux").exists()
        started = time.monotonic()
        with open(log, "w") as logf:
            runner = _MakeRunner(req, work, logf)
            runner.run(["allnoconfig"], "allnoconfig")
            dotconfig = work / ".config"
            dotconfig.write_text(kconfig.apply_fragment(dotconfig.read_text(), req.requested))
            runner.run(["olddefconfig"], "olddefconfig")
            final = kconfig.parse_dotconfig(dotconfig.read_text())
            kconfig.check_survived(req.requested, final, symbols)
            kconfig.check_combinations(final)
            runner.run([f"-j{req.jobs}", "Image", "vmlinux"], "build", progress=True)
        seconds = time.monotonic() - started
        meta = {
            "key": key, "source": req.source.identity, "origin": req.source.origin,
            "version": req.source.version, "compiler": compiler, "fragment": fragment,
            "build_seconds": round(seconds, 1), "cold": cold, "jobs": req.jobs,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with atomic_dir(entry) as tmp:
            for name, rel in ARTIFACTS.items():
                shutil.copy2(work / rel, tmp / name)
            shutil.copy2(log, tmp / "build.log")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return KernelArtifacts(key, entry, meta, reused=False)


class _MakeRunner:
    """Runs kbuild make steps into one log, with a deadline and progress, killing on interrupt."""

    def __init__(self, req: BuildRequest, work: Path, logf) -> None:
        self.req = req
        self.work = work
        self.logf = logf
        self.deadline = time.monotonic() + req.timeout
        self.env = dict(os.environ, KBUILD_BUILD_USER="pkvm-harness", KBUILD_BUILD_HOST="harness",
                        KBUILD_BUILD_TIMESTAMP="1970-01-01", GIT_OPTIONAL_LOCKS="0", LC_ALL="C")

    def run(self, targets: list[str], step: str, progress: bool = False) -> None:
        argv = ["make", "-C", str(self.req.source.tree), f"O={self.work}", "ARCH=arm64",
                f"CROSS_COMPILE={self.req.cross_compile}", *targets]
        self.logf.write(f"$ {' '.join(argv)}\n")
        self.logf.flush()
        bar = Progress(f"kernel {step}", quiet=self.req.quiet or not progress)
        tail: list[str] = []
        # Its own process group, so _kill_group stops make's compilers too. If the harness is
        # killed outright (SIGKILL: no handler runs), make gets SIGTERM from the kernel (it removes
        # half-written targets and signals its shells) and the guard ends the rest of the group
        # (cc1, ld, which survive make's own SIGTERM handling).
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", env=self.env, start_new_session=True,
                                preexec_fn=die_with_parent(signal.SIGTERM))
        guard = GroupGuard(proc.pid)
        timed_out = threading.Event()

        def on_deadline() -> None:
            timed_out.set()
            _kill_group(proc)

        timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), on_deadline)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                self.logf.write(line)
                tail = (tail + [line.rstrip()])[-40:]
                bar.update(line.strip())
            rc = proc.wait()
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            timer.cancel()
            guard.dismiss()
            self.logf.flush()
        if timed_out.is_set():
            raise BuildError(f"kernel {step} passed its {self.req.timeout:.0f}s deadline",
                             log=Path(self.logf.name), hint="raise --build-timeout or check the log")
        if rc != 0:
            errors = [t for t in tail if "error" in t.lower() or "Error " in t]
            first = errors[0] if errors else (tail[-1] if tail else "")
            raise BuildError(f"kernel {step} failed (make exited {rc}): {first.strip()[:200]}",
                             log=Path(self.logf.name), hint=f"full log: {self.logf.name}")
        if progress:
            bar.done(f"{step} finished")


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop make and its compiler children: the group we created for this PID only."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

