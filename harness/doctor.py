"""`pkvm-harness doctor`: every prerequisite, whether it is there, and the command that fixes it."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness import REPO_ROOT
from harness.kernel import debian

PACKAGES_FILE = REPO_ROOT / "ci" / "debian-packages.txt"
PYTHON_MODULES = {"pexpect": "pexpect", "elftools": "pyelftools", "paramiko": "paramiko",
                  "jinja2": "jinja2", "qemu.qmp": "qemu.qmp", "pytest": "pytest"}
TOOLS = ("qemu-system-aarch64", "aarch64-linux-gnu-gcc", "gdb-multiarch", "make", "tar", "git", "dpkg-deb",
         "rsync", "dropbearkey")
MIN_FREE_GIB = 8


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str


def debian_packages() -> list[str]:
    names = []
    for line in PACKAGES_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line.split()[0])
    return names


def _installed(packages: list[str]) -> set[str]:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Status}\n", *packages],
                       capture_output=True, text=True)
    return {line.split()[0] for line in r.stdout.splitlines() if line.endswith("install ok installed")}


def checks(cache_dir: Path) -> list[Check]:
    out: list[Check] = []
    pkgs = debian_packages()
    have = _installed(pkgs) if shutil.which("dpkg-query") else set()
    for p in pkgs:
        out.append(Check(f"deb {p}", p in have, "installed" if p in have else "missing",
                         f"apt-get install -y {p}   (or: make setup)"))
    foreign = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True,
                             text=True).stdout.split() if shutil.which("dpkg") else []
    out.append(Check("dpkg arch arm64", "arm64" in foreign,
                     "enabled" if "arm64" in foreign else "not enabled (needed for busybox-static:arm64)",
                     "dpkg --add-architecture arm64 && apt-get update"))
    for tool in TOOLS:
        path = shutil.which(tool)
        out.append(Check(f"tool {tool}", bool(path), path or "not on PATH", "make setup"))
    for series, src in debian.SOURCES.items():
        tarball = src.tarball(cache_dir)
        if src.suite is None:
            out.append(Check(f"kernel source {series}", tarball.is_file(), str(tarball),
                             f"apt-get install -y {src.package}   (or: make setup)"))
        else:                     # not installed: fetched into the cache on first use
            out.append(Check(f"kernel source {series}", True, str(tarball) if tarball.is_file() else
                             f"not fetched yet: --kernel {series} fetches it once from Debian {src.suite}", ""))
    out += _qemu_checks(cache_dir)
    for module, dist in PYTHON_MODULES.items():
        found = importlib.util.find_spec(module.split(".")[0]) is not None
        if found and "." in module:
            found = importlib.util.find_spec(module) is not None
        out.append(Check(f"python {dist}", found, "importable" if found else "missing",
                         "make setup   (creates .venv with requirements.lock)"))
    probe = cache_dir if cache_dir.exists() else next(p for p in cache_dir.parents if p.exists())
    free = shutil.disk_usage(probe).free / 2**30
    out.append(Check("disk space", free >= MIN_FREE_GIB, f"{free:.0f} GiB free at {probe}",
                     f"free at least {MIN_FREE_GIB} GiB or pass --cache-dir on a bigger disk"))
    return out


def _qemu_checks(cache_dir: Path) -> list[Check]:
    """QEMU's version, and whether it loads el2trace (built on first use: nothing is fetched here)."""
    from harness.el2.tcg import build as plugin_build
    from harness.errors import HarnessError

    try:
        qemu = plugin_build.qemu_info("qemu-system-aarch64")
    except HarnessError as e:
        return [Check("qemu version", False, e.one_line(), "make setup")]
    fix = "make setup   (installs QEMU 10 from bookworm-backports)"
    out = [Check("qemu version", qemu.has_plugins, f"{qemu.text} ({qemu.path})"
                 + ("" if qemu.has_plugins else ": no EL2 plugin, the gdbstub tracer is used"), fix)]
    if not qemu.has_plugins:
        return out
    lib = plugin_build.built_plugin(qemu, cache_dir)
    if lib is None:
        out.append(Check("qemu plugin el2trace", True, "not built yet: built on first use (fetches Debian's "
                         "qemu-plugin.h once, about 40 MB)", ""))
    else:
        ok, said = plugin_build.loads(qemu, lib)
        out.append(Check("qemu plugin el2trace", ok, f"{lib.name} {'loads' if ok else 'does not load: ' + said}",
                         f"rm {lib} (it is rebuilt on next use)"))
    return out


def render(results: list[Check]) -> str:
    width = max(len(c.name) for c in results)
    lines = []
    for c in results:
        status = "ok     " if c.ok else "MISSING"
        line = f"{status} {c.name:<{width}}  {c.detail}"
        if not c.ok:
            line += f"\n        {'':<{width}}  fix: {c.fix}"
        lines.append(line)
    missing = sum(not c.ok for c in results)
    lines.append(f"{len(results) - missing} ok, {missing} missing")
    return "\n".join(lines)
