"""Guest-side programs: the harness's own C payloads (rootfs/payloads/*.c) and KVM selftests
from the kernel tree under test, all static aarch64 binaries.

Built once per kernel cache key into payloads/<id>/bin/ (atomically). Headers come from
`make headers_install` into the kernel's O= directory, so the source tree is never written.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness import REPO_ROOT
from harness.errors import BuildError, UsageError
from harness.fsutil import atomic_dir, file_lock
from harness.kernel.build import BuildRequest, KernelArtifacts, work_dir_for
from harness.kernel.version import KernelVersion
from harness.procs import run_group

PAYLOAD_SOURCES = REPO_ROOT / "rootfs" / "payloads"
SELFTESTS_FILE = REPO_ROOT / "rootfs" / "kvm-selftests.txt"
GUEST_DIR = "/opt/pkvm-harness/bin"    # where payloads live in the initramfs
_TIMEOUT = 900.0
# The VM_MODE_* names of the tree's KVM selftests, in enum order: `-m N` means a different mode
# in different kernels (6.12 added P52V48_16K second), so kvm-selftests.txt names modes instead.
GUEST_MODES = "kvm-selftests/guest-modes"
_MODE_ENUM_RE = re.compile(r"enum vm_guest_mode \{(.*?)\};", re.S)
_MODE_ARG_RE = re.compile(r"(?<!\S)-m (P\w+)")


@dataclass(frozen=True)
class Payloads:
    dir: Path                  # .../bin; relative paths below it are the payload names

    def names(self) -> list[str]:
        return sorted(str(p.relative_to(self.dir)) for p in self.dir.rglob("*") if p.is_file())

    def path(self, name: str) -> Path:
        return self.dir / name


@dataclass(frozen=True)
class Selftest:
    name: str                   # path under tools/testing/selftests/kvm, spelt arm64/...
    args: str
    kernels: str | None = None  # "7.3+" and the like: only kernels in that range run it
    xfail: str | None = None    # expected to fail: "" on every kernel it runs on, or on a range ("-7.2")

    def runs_on(self, version: KernelVersion) -> bool:
        return self.kernels is None or version.in_series_range(self.kernels)

    def fails_on(self, version: KernelVersion) -> bool:
        return self.xfail is not None and (self.xfail == "" or version.in_series_range(self.xfail))


def selftest_lines() -> list[Selftest]:
    """One Selftest per line of rootfs/kvm-selftests.txt: `[RANGE:] [xfail[@RANGE]:] path [arguments]`."""
    out = []
    for lineno, line in enumerate(SELFTESTS_FILE.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        kernels: str | None = None
        xfail: str | None = None
        while (first := text.split(None, 1)[0]).endswith(":"):
            word, text = first[:-1], text[len(first):].strip()
            if word == "xfail" or word.startswith("xfail@"):
                xfail = word.removeprefix("xfail").removeprefix("@")
                word = xfail
            else:
                kernels = word
            try:
                if word:
                    KernelVersion(6, 12).in_series_range(word)
            except ValueError as e:
                raise UsageError(f"{SELFTESTS_FILE.name}:{lineno}: {e}",
                                 hint="write e.g. `7.3+: arm64/x` or `6.12+: xfail@-7.2: arm64/x`") from None
        words = text.split(None, 1)
        out.append(Selftest(words[0], words[1].strip() if len(words) > 1 else "", kernels, xfail))
    return out


def selftest_names(version: KernelVersion | None = None) -> list[str]:
    """The list's names; with `version`, only those that kernel runs."""
    return [t.name for t in selftest_lines() if version is None or t.runs_on(version)]


def tree_path(name: str, version: KernelVersion) -> str:
    """A kvm-selftests.txt name (spelt arm64/..., as the kernel has since 6.13) as this tree spells it."""
    arch, sep, rest = name.partition("/")
    return f"{version.selftests_arch}/{rest}" if sep and arch == "arm64" else name


def guest_modes(selftests_dir: Path) -> list[str]:
    """The tree's guest modes in enum order, without VM_MODE_ (kvm_util.h; kvm_util_base.h before 6.9)."""
    for header in ("include/kvm_util.h", "include/kvm_util_base.h"):
        path = selftests_dir / header
        m = _MODE_ENUM_RE.search(path.read_text()) if path.is_file() else None
        if m:
            body = re.sub(r"/\*.*?\*/", "", m.group(1))
            return [w.strip().removeprefix("VM_MODE_") for w in body.split(",")
                    if w.strip() and w.strip() != "NUM_VM_MODES"]
    raise BuildError(f"no enum vm_guest_mode in {selftests_dir}/include",
                     hint="is this a kernel tree with KVM selftests?")


def resolve_guest_modes(args: str, modes: list[str]) -> str:
    """`-m P40V48_4K` -> `-m <its number in this kernel>`; a mode the kernel lacks is an error."""
    def number(m: re.Match[str]) -> str:
        if m.group(1) not in modes:
            raise ValueError(f"guest mode {m.group(1)} is not among this kernel's: {', '.join(modes)}")
        return f"-m {modes.index(m.group(1))}"
    return _MODE_ARG_RE.sub(number, args)


def _sources_digest() -> str:
    h = hashlib.sha256(SELFTESTS_FILE.read_bytes())
    for src in sorted(PAYLOAD_SOURCES.glob("*.c")):
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    return h.hexdigest()[:16]


def build_payloads(req: BuildRequest, kernel: KernelArtifacts) -> Payloads:
    # Keyed by what the payloads are built from (the source's userspace side, the compiler), not
    # by the kernel: kernel-only patch sets (mutants, bisect steps) share one build.
    side = hashlib.sha256(f"{req.source.userspace_identity}\0{kernel.meta.get('compiler', '')}".encode()).hexdigest()
    entry = req.cache_dir / "payloads" / f"{side[:24]}-{_sources_digest()}"
    if (entry / "bin").is_dir():
        return Payloads(entry / "bin")
    work = work_dir_for(req)
    gcc = f"{req.cross_compile}gcc"
    with file_lock(work.with_name(work.name + ".lock")):
        if (entry / "bin").is_dir():
            return Payloads(entry / "bin")
        with atomic_dir(entry) as tmp:
            log = tmp / "payloads.log"
            _run(["make", "-C", str(req.source.tree), f"O={work}", "ARCH=arm64", "headers_install"], log)
            headers = work / "usr" / "include"
            bin_dir = tmp / "bin"
            bin_dir.mkdir()
            for src in sorted(PAYLOAD_SOURCES.glob("*.c")):
                _run([gcc, "-static", "-O2", "-Wall", "-Werror", "-isystem", str(headers),
                      "-o", str(bin_dir / src.stem), str(src)], log)
            kst = tmp / "kvm-selftests"
            (kst / "tools").mkdir(parents=True)   # the arm64 sysreg header generator wants it to exist
            # Built under the tree's own spelling, baked in under the list's (stable test names).
            version = KernelVersion.parse(req.source.version)
            names = {name: tree_path(name, version) for name in selftest_names(version)}
            # OUTPUT, abs_objdir and TMPOUT keep every object, generated header and probe file
            # out of the source tree.
            _run(["make", "-C", str(req.source.tree / "tools/testing/selftests/kvm"), "ARCH=arm64",
                  f"CROSS_COMPILE={req.cross_compile}", f"OUTPUT={kst}", f"abs_objdir={kst}",
                  f"TMPOUT={kst}/.tmp_probe",
                  f"LINUX_HDR_PATH={headers}/", "EXTRA_CFLAGS=-static", "LDFLAGS=-static -pthread",
                  f"-j{req.jobs}", *[str(kst / n) for n in names.values()]], log)
            for name, built in names.items():
                dest = bin_dir / "kvm-selftests" / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                (kst / built).rename(dest)
            modes = guest_modes(req.source.tree / "tools/testing/selftests/kvm")
            (bin_dir / GUEST_MODES).write_text("\n".join(modes) + "\n")
            shutil.rmtree(kst)
    return Payloads(entry / "bin")


def _run(argv: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(argv)}\n")
        f.flush()
        try:
            # make and gcc have children of their own (cc1, as, ld): the whole group is stopped on
            # a deadline or an interrupt, and when the harness is killed outright.
            rc = run_group(argv, timeout=_TIMEOUT, stdout=f, stderr=subprocess.STDOUT)
        except subprocess.TimeoutExpired:
            raise BuildError(f"payload build passed its {_TIMEOUT:.0f}s deadline: {argv[0]}", log=log) from None
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-5:]
        raise BuildError(f"payload build failed ({Path(argv[0]).name} exited {rc}): "
                         f"{' | '.join(t.strip() for t in tail)[:300]}", log=log)
