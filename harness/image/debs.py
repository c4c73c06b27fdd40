"""arm64 Debian packages for the initramfs: fetched once with `apt-get download`, cached, and
read with `dpkg-deb --fsys-tarfile`, so nothing is installed on the host."""

from __future__ import annotations

import io
import os
import posixpath
import signal
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from harness import REPO_ROOT
from harness.errors import InfraError, UsageError
from harness.fsutil import file_lock
from harness.procs import die_with_parent

PACKAGES_FILE = REPO_ROOT / "rootfs" / "packages.txt"


@dataclass(frozen=True)
class PackageFiles:
    package: str
    files: tuple[str, ...]   # paths inside the package, without a leading "./"


def read_package_list(path: Path = PACKAGES_FILE) -> list[PackageFiles]:
    out = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].split()
        if not line:
            continue
        if len(line) < 2:
            raise UsageError(f"{path}:{lineno}: expected 'package file...'", hint="name the files to take")
        out.append(PackageFiles(line[0], tuple(line[1:])))
    return out


def cached_debs(cache_dir: Path) -> dict[str, Path]:
    """{package: the .deb fetch_deb would return} for every arm64 .deb in the cache, from one
    directory listing (no lock, no download: for looking the image up in its index)."""
    out: dict[str, Path] = {}
    try:
        names = sorted(os.listdir(cache_dir / "debs"))
    except FileNotFoundError:
        return out
    for name in names:                     # sorted: the last of a package's versions wins, as in fetch_deb
        if name.endswith("_arm64.deb") and name.count("_") >= 2:
            out[name.split("_", 1)[0]] = cache_dir / "debs" / name
    return out


def fetch_deb(package: str, cache_dir: Path) -> Path:
    """The cached .deb of `package` for arm64, downloading it the first time."""
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    with file_lock(debs / ".lock"):
        found = sorted(debs.glob(f"{package}_*_arm64.deb"))
        if found:
            return found[-1]
        # die_with_parent: apt-get (and, through their pipes, its download methods) ends with the
        # harness, even a SIGKILLed one.
        r = subprocess.run(["apt-get", "download", f"{package}:arm64"], cwd=debs,
                           capture_output=True, text=True, preexec_fn=die_with_parent(signal.SIGTERM))
        found = sorted(debs.glob(f"{package}_*_arm64.deb"))
        if r.returncode != 0 or not found:
            reason = (r.stderr.strip().splitlines() or ["no .deb appeared"])[-1]
            raise InfraError(f"could not download {package}:arm64: {reason}",
                             hint="run `make setup` (it enables the arm64 architecture and runs apt-get update)")
        return found[-1]


def extract(deb: Path, members: tuple[str, ...]) -> dict[str, tuple[bytes, int]]:
    """Read files out of a .deb: {path: (bytes, permission bits)}; symlinks are resolved."""
    r = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                       preexec_fn=die_with_parent(signal.SIGTERM))
    if r.returncode != 0:
        raise InfraError(f"cannot read {deb}: {r.stderr.decode(errors='replace').strip()}",
                         hint=f"delete {deb} and run again to download it afresh")
    out: dict[str, tuple[bytes, int]] = {}
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tar:
        for member in members:
            info = _resolve(tar, member, deb)
            f = tar.extractfile(info)
            assert f is not None
            out[member] = (f.read(), info.mode & 0o7777)
    return out


def _resolve(tar: tarfile.TarFile, member: str, deb: Path, depth: int = 0) -> tarfile.TarInfo:
    try:
        info = tar.getmember("./" + member)
    except KeyError:
        raise InfraError(f"{deb.name} has no {member}", hint=f"fix {PACKAGES_FILE.name}") from None
    if info.issym() and depth < 8:
        target = posixpath.normpath(posixpath.join(posixpath.dirname(member), info.linkname))
        return _resolve(tar, target.lstrip("/"), deb, depth + 1)
    return info
