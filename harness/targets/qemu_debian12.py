"""Debian 12's own QEMU 7.2, beside the QEMU 10 `make setup` installs: taken out of its .deb into
the cache once (`apt-get download` from the system's own bookworm lists: nothing installed, no
list touched; its shared libraries are those QEMU 10 left installed). For what must keep working
on 7.2 (the gdbstub tracer, `--qemu PATH`) and for the benchmarks' side-by-side boot figures."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from harness.errors import InfraError
from harness.fsutil import file_lock
from harness.procs import die_with_parent

SERIES = "1:7.2"


def qemu_7_2(cache_dir: Path) -> Path:
    """The qemu-system-aarch64 of Debian 12's qemu-system-arm 7.2 (fetched once)."""
    binary = cache_dir / "qemu" / "7.2" / "qemu-system-aarch64"
    if binary.is_file():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(binary.parent.with_name("7.2.lock")):
        if binary.is_file():
            return binary
        madison = subprocess.run(["apt-cache", "madison", "qemu-system-arm"], capture_output=True, text=True,
                                 timeout=60).stdout
        versions = [line.split("|")[1].strip() for line in madison.splitlines()
                    if "bookworm/main" in line and line.split("|")[1].strip().startswith(SERIES)]
        if not versions:
            raise InfraError("apt knows no qemu-system-arm 7.2 in bookworm/main",
                             hint="run `apt-get update` (the system's own lists)")
        with tempfile.TemporaryDirectory(prefix="qemu-7.2-") as tmp:
            r = subprocess.run(["apt-get", "download", "-q", f"qemu-system-arm={versions[0]}"], cwd=tmp,
                               capture_output=True, text=True, timeout=600, preexec_fn=die_with_parent())
            debs = list(Path(tmp).glob("qemu-system-arm_*.deb"))
            if r.returncode != 0 or not debs:
                raise InfraError(f"apt-get download qemu-system-arm={versions[0]} failed: "
                                 f"{(r.stderr.strip().splitlines() or ['no output'])[-1][:300]}",
                                 hint="check that deb.debian.org is reachable")
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), tmp], check=True, timeout=120)
            part = binary.with_suffix(".part")
            (Path(tmp) / "usr" / "bin" / "qemu-system-aarch64").rename(part)
            part.rename(binary)
    return binary
