"""Debian's kernel source packages (`--kernel X.Y`): linux-source-X.Y holds one tarball,
/usr/src/linux-source-X.Y.tar.xz.

6.12 and 6.1 come from Debian 12 itself and are installed by `make setup`. Newer series live in
other suites (7.3 in trixie-backports, 7.2 in sid): their package is fetched with `apt-get
download` through a private apt state in the cache (its own sources.list, lists and cache
directories), verified by apt against the suite's signed index, and only the tarball is taken
out of it, once. The system's own apt lists are never touched: an `apt-get update` with another
source list against them would delete the other suites' indexes.
"""

from __future__ import annotations

import contextlib
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.errors import InfraError, UsageError
from harness.fsutil import file_lock, take_tar_member
from harness.procs import die_with_parent

MIRROR = "http://deb.debian.org/debian"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


@dataclass(frozen=True)
class DebianSource:
    series: str                 # "7.3"
    suite: str | None = None    # None: Debian 12's own, installed by `make setup`

    @property
    def package(self) -> str:
        return f"linux-source-{self.series}"

    @property
    def member(self) -> str:
        return f"usr/src/{self.package}.tar.xz"

    def tarball(self, cache_dir: Path) -> Path:
        """Where the tarball is (installed), or will be once fetched (in the cache)."""
        if self.suite is None:
            return Path("/") / self.member
        return cache_dir / "debian" / self.package / f"{self.package}.tar.xz"


# The series `--kernel` takes, oldest first; DEFAULT is what runs without --kernel.
SOURCES = {s.series: s for s in (DebianSource("6.1"), DebianSource("6.12"),
                                  DebianSource("7.2", "sid"), DebianSource("7.3", "trixie-backports"))}
DEFAULT = "6.12"


def tarball(series: str, cache_dir: Path, *, quiet: bool = False) -> Path:
    """The tarball of `--kernel series`: installed, fetched before, or fetched now."""
    if series not in SOURCES:
        raise UsageError(f"--kernel {series} is not a Debian kernel source the harness knows",
                         hint=f"use one of {', '.join(SOURCES)}, or --kernel-src PATH for any tree")
    src = SOURCES[series]
    path = src.tarball(cache_dir)
    if path.is_file():
        return path
    if src.suite is None:
        raise UsageError(f"the kernel source {path} is missing",
                         hint=f"run `make setup` (installs {src.package}) or pass --kernel-src PATH")
    return fetch(src, cache_dir, quiet=quiet)


@dataclass(frozen=True)
class PrivateApt:
    dir: Path
    options: list[str]

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["apt-get", *self.options, *args], capture_output=True, text=True, timeout=1800,
                              cwd=self.dir, preexec_fn=die_with_parent())


@contextlib.contextmanager
def apt_private(home: Path, sources: str) -> Iterator[PrivateApt]:
    """A throw-away apt state under `home` (its own sources.list, lists and cache), updated from
    `sources`: apt-get bound to it, run in that directory. All of it is gone after."""
    with tempfile.TemporaryDirectory(dir=home, prefix=".apt-") as tmp:
        state = Path(tmp)
        (state / "lists" / "partial").mkdir(parents=True)
        (state / "cache" / "archives" / "partial").mkdir(parents=True)
        (state / "sources.list").write_text(sources)
        options = ["-q", "-o", f"Dir::Etc::sourcelist={state / 'sources.list'}", "-o", "Dir::Etc::sourceparts=-",
                   "-o", f"Dir::State::Lists={state / 'lists'}", "-o", f"Dir::Cache={state / 'cache'}",
                   "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root"]

        apt = PrivateApt(state, options)
        r = apt("update")
        if r.returncode != 0:
            said = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise InfraError(f"apt-get update ({sources.strip().splitlines()[0]}) failed: {said[:300]}",
                             hint=f"check that {MIRROR} is reachable; nothing was changed in the "
                                  "system's apt state")
        yield apt


def fetch(src: DebianSource, cache_dir: Path, *, quiet: bool = False) -> Path:
    """Download src's package through a private apt state and keep its tarball in the cache."""
    assert src.suite is not None
    final = src.tarball(cache_dir)
    home = final.parent
    home.mkdir(parents=True, exist_ok=True)
    with file_lock(home.with_name(home.name + ".lock")):
        if final.is_file():
            return final
        if not quiet:
            print(f"fetch: {src.package} from Debian {src.suite} (once, about 170 MB)", flush=True)
        with apt_private(home, f"deb [signed-by={KEYRING}] {MIRROR} {src.suite} main\n") as apt:
            r = apt("download", src.package)
            if r.returncode != 0:
                said = (r.stderr.strip().splitlines() or ["no output"])[-1]
                raise InfraError(f"apt-get download {src.package} ({src.suite}) failed: {said[:300]}",
                                 hint=f"check that {MIRROR} is reachable; nothing was changed in the "
                                      "system's apt state")
            (deb,) = apt.dir.glob(f"{src.package}_*_all.deb")
            _take_tarball(deb, src.member, final)
        if not quiet:
            print(f"fetch: {final} ({final.stat().st_size >> 20} MB, from {deb.name})", flush=True)
    return final


def _take_tarball(deb: Path, member: str, final: Path) -> None:
    """Copy the one member out of the .deb's data archive (no install, no root paths written)."""
    r = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                         preexec_fn=die_with_parent())
    assert r.stdout is not None
    try:
        with tarfile.open(fileobj=r.stdout, mode="r|") as tar:
            found = take_tar_member(tar, lambda name: name.lstrip("./") == member, final)
    finally:
        r.stdout.close()
        r.wait()
    if not found:
        raise InfraError(f"{deb.name} holds no {member}", hint=f"delete {deb} and run again")
    if r.returncode not in (0, -13):     # -13: SIGPIPE, when the member was found before the end
        final.unlink()
        raise InfraError(f"dpkg-deb could not read {deb.name} (exit {r.returncode})", hint=f"delete {deb}")
