"""Build the el2trace TCG plugin for the QEMU that will run it, once, in the cache.

The plugin API header (`qemu-plugin.h`) is not installed by any Debian binary package: it comes
from Debian's `qemu` source package of the same version, fetched through a private apt state (the
system's apt lists are never touched; see harness/kernel/debian.py), verified against the suite's
signed Sources index, and cached with only the header kept. glib's headers come from
libglib2.0-dev (`make setup`).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from harness.errors import InfraError, UsageError
from harness.fsutil import file_lock, take_tar_member
from harness.kernel.debian import KEYRING, MIRROR, apt_private
from harness.procs import die_with_parent

SOURCE = Path(__file__).with_name("el2trace.c")
# qemu_plugin_read_register (9.0) and qemu_plugin_read_memory_vaddr (9.1): plugin API version 4.
MIN_QEMU = (9, 1)
# The suites whose Debian QEMU can run the plugin (10.0 in backports; 7.2 in bookworm cannot, but
# names a clear error if asked).
SUITES = ("bookworm-backports", "bookworm")


@dataclass(frozen=True)
class QemuInfo:
    path: str
    version: tuple[int, int, int]
    debian_version: str | None        # the package's version when it is Debian's build, else None

    @property
    def text(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def has_plugins(self) -> bool:
        """Can this QEMU run el2trace (registers and memory readable from a plugin)?"""
        return self.version[:2] >= MIN_QEMU


def qemu_info(qemu: str) -> QemuInfo:
    """`qemu --version`, parsed: "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"."""
    path = shutil.which(qemu)
    if not path:
        raise UsageError(f"QEMU binary {qemu} not found", hint="run `make setup` or pass --qemu PATH")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)(?: \(Debian ([^)]+)\))?", out)
    if not m:
        raise InfraError(f"{path} --version printed no version: {out.strip()[:200]!r}",
                         hint="pass --qemu PATH to a qemu-system-aarch64")
    return QemuInfo(path, (int(m[1]), int(m[2]), int(m[3])), m[4])


def source_version(debian_version: str) -> str:
    """The source package version of a binary package version (a binNMU's +bN suffix dropped)."""
    return re.sub(r"\+b\d+$", "", debian_version)


def built_plugin(qemu: QemuInfo, cache_dir: Path) -> Path | None:
    """The plugin already built for this QEMU, if it is (nothing fetched or compiled)."""
    if qemu.debian_version is None:
        return None
    lib = _home(qemu.debian_version, cache_dir) / _lib_name()
    return lib if lib.is_file() else None


def loads(qemu: QemuInfo, lib: Path, timeout: float = 30.0) -> tuple[bool, str]:
    """Does this QEMU load the plugin? (QEMU refuses a plugin it cannot load before it starts a
    machine; `-M none` with `quit` on the monitor then exits at once.)"""
    with tempfile.TemporaryDirectory(prefix="el2trace-probe-") as tmp:
        spec = Path(tmp) / "spec"
        spec.write_text("")
        try:
            r = subprocess.run([qemu.path, "-M", "none", "-display", "none", "-monitor", "stdio", "-plugin",
                                f"{lib},spec={spec},out={Path(tmp) / 'out'}"], input="quit\n", capture_output=True,
                               text=True, timeout=timeout, preexec_fn=die_with_parent())
        except subprocess.TimeoutExpired:
            return False, f"QEMU did not exit within {timeout:.0f}s"
    said = (r.stderr.strip().splitlines() or [""])[-1]
    return r.returncode == 0, said or "loaded"


def _home(debian_version: str, cache_dir: Path) -> Path:
    return cache_dir / "qemu-plugin" / re.sub(r"[^\w.+~-]", "_", source_version(debian_version))


def _lib_name() -> str:
    return f"el2trace-{hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]}.so"


def plugin_path(qemu: QemuInfo, cache_dir: Path, *, quiet: bool = False) -> Path:
    """The built plugin for this QEMU (built now if needed). UsageError if it cannot run plugins."""
    if not qemu.has_plugins:
        raise UsageError(f"{qemu.path} is QEMU {qemu.text}: the EL2 plugin needs QEMU "
                         f"{MIN_QEMU[0]}.{MIN_QEMU[1]} or newer",
                         hint="run `make setup` (QEMU 10 from bookworm-backports), or pass --el2-plugin off "
                              "(`pkvm-harness trace` then uses the gdbstub tracer)")
    if qemu.debian_version is None:
        raise UsageError(f"{qemu.path} is not Debian's QEMU: the harness takes the plugin header from "
                         "Debian's source package of the same version",
                         hint="use Debian's qemu-system-arm (`make setup`), or pass --el2-plugin off")
    src_version = source_version(qemu.debian_version)
    home = _home(qemu.debian_version, cache_dir)
    lib = home / _lib_name()
    if lib.is_file():
        return lib
    home.mkdir(parents=True, exist_ok=True)
    with file_lock(home.with_name(home.name + ".lock")):
        if lib.is_file():
            return lib
        header = home / "qemu-plugin.h"
        if not header.is_file():
            _fetch_header(src_version, header, quiet=quiet)
        _compile(header.parent, lib)
    return lib


def _compile(include: Path, lib: Path) -> None:
    glib = subprocess.run(["pkg-config", "--cflags", "glib-2.0"], capture_output=True, text=True, timeout=30)
    if glib.returncode != 0:
        raise UsageError("glib's development headers are missing (pkg-config glib-2.0 failed)",
                         hint="run `make setup` (installs libglib2.0-dev)")
    tmp = lib.with_suffix(".part")
    r = subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", f"-I{include}",
                        *glib.stdout.split(), "-o", str(tmp), str(SOURCE)],
                       capture_output=True, text=True, timeout=300, preexec_fn=die_with_parent())
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise InfraError(f"building {SOURCE.name} failed: {r.stderr.strip()[-600:]}",
                         hint=f"the header in {include} should match the QEMU version")
    tmp.rename(lib)


def _fetch_header(version: str, header: Path, *, quiet: bool) -> None:
    """qemu-plugin.h out of Debian's qemu source tarball `version` (about 40 MB, fetched once)."""
    if not quiet:
        print(f"fetch: the QEMU plugin header from Debian's qemu {version} source (once, about 40 MB)", flush=True)
    sources = "".join(f"deb-src [signed-by={KEYRING}] {MIRROR} {s} main\n" for s in SUITES)
    with apt_private(header.parent, sources) as apt:
        r = apt("source", "--print-uris", f"qemu={version}")
        uris = re.findall(r"^'(\S+)' (\S+\.orig\.tar\.\w+) (\d+) SHA256:([0-9a-f]{64})", r.stdout, re.M)
        if r.returncode != 0 or not uris:
            said = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise InfraError(f"Debian has no qemu {version} source in {', '.join(SUITES)}: {said[:300]}",
                             hint="pass --el2-plugin off to run without the plugin")
        url, name, _size, sha = uris[0]
        with tempfile.TemporaryDirectory(dir=header.parent, prefix=".src-") as tmp:
            tarball = Path(tmp) / name
            _download(url, tarball, sha)
            _extract_member(tarball, "include/qemu/qemu-plugin.h", header)


def _download(url: str, dest: Path, sha256: str) -> None:
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=120) as resp, open(dest, "wb") as out:
            while chunk := resp.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
    except OSError as e:
        raise InfraError(f"downloading {url} failed: {e}", hint=f"check that {MIRROR} is reachable") from None
    if h.hexdigest() != sha256:
        raise InfraError(f"{dest.name}: SHA256 {h.hexdigest()} is not the signed index's {sha256}",
                         hint="run again; if it persists, the mirror is serving a wrong file")


def _extract_member(tarball: Path, suffix: str, dest: Path) -> None:
    def wanted(name: str) -> bool:           # <top directory>/<suffix>
        return name.endswith("/" + suffix) and name.count("/") == suffix.count("/") + 1

    with tarfile.open(tarball) as tar:
        if not take_tar_member(tar, wanted, dest):
            raise InfraError(f"{tarball.name} holds no {suffix}", hint="delete the cache directory and run again")


def main() -> int:
    """`python -m harness.el2.tcg.build`: build el2trace for the default QEMU now (ci/setup.sh)."""
    from harness.paths import default_cache_dir

    qemu = qemu_info("qemu-system-aarch64")
    if not qemu.has_plugins:
        print(f"setup: QEMU {qemu.text} cannot run el2trace; the gdbstub tracer will be used")
        return 0
    try:
        print(f"setup: el2trace for QEMU {qemu.text}: {plugin_path(qemu, default_cache_dir(), quiet=True)}")
    except (InfraError, UsageError) as e:          # set-up goes on: `auto` then runs without it
        print(f"setup: el2trace not built: {e.one_line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
