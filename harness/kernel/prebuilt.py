"""A kernel the developer built themselves (`--kernel-build DIR`, their O= directory): used in
place, never rebuilt. The guest programs (KVM selftests, uapi headers) are still built, from the
source tree kbuild links as DIR/source, or from --kernel-src.

The directory must hold arch/arm64/boot/Image, vmlinux and .config, and the .config must have
pKVM's options (kernel_configs/pkvm.config and the version's fragment): otherwise the harness
would boot a kernel that cannot run protected mode and blame the hypervisor. The artifacts are
linked (not copied: a vmlinux with DWARF is hundreds of MB) into a cache entry keyed by their
path, size and mtime, so a rebuild in DIR is picked up on the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from harness.errors import UsageError
from harness.fsutil import atomic_dir
from harness.kernel import config as kconfig
from harness.kernel.build import KernelArtifacts

FILES = {"Image": "arch/arm64/boot/Image", "vmlinux": "vmlinux", "System.map": "System.map"}


def source_of(build_dir: Path) -> Path:
    """The source tree of an O= build directory: kbuild's `source` link in it."""
    link = build_dir / "source"
    if not link.is_symlink():
        raise UsageError(f"--kernel-build {build_dir} is not an O= build directory (no `source` link)",
                         hint="build with `make O=DIR`, or give the clean source tree with --kernel-src "
                              "(the guest programs are built from it)")
    return link.resolve()


def check_files(build_dir: Path) -> None:
    """A UsageError unless `build_dir` holds a built arm64 kernel."""
    if not build_dir.is_dir():
        raise UsageError(f"--kernel-build {build_dir} is not a directory", hint="pass your kernel's O= directory")
    missing = [rel for rel in (*FILES.values(), ".config") if not (build_dir / rel).is_file()]
    if missing:
        raise UsageError(f"--kernel-build {build_dir} has no {', '.join(missing)}",
                         hint="build it first: make ARCH=arm64 O=DIR Image vmlinux")


def check_config(build_dir: Path, version: str | None = None) -> dict[str, str]:
    """The .config of `build_dir`, or a UsageError naming the pKVM options it lacks."""
    final = kconfig.parse_dotconfig((build_dir / ".config").read_text())
    wanted = kconfig.merge([], [], version=version)
    lacking = [f"CONFIG_{o.name}={o.value}" for o in wanted.values() if final.get(o.name, "n") != o.value]
    if lacking:
        raise UsageError(f"--kernel-build {build_dir}: its .config lacks pKVM's {', '.join(lacking)}",
                         hint="add kernel_configs/pkvm.config to the config (scripts/kconfig/merge_config.sh) "
                              "and rebuild")
    return final


def use(build_dir: Path, cache_dir: Path, version: str) -> KernelArtifacts:
    """Artifacts for the kernel in `build_dir` (checked by `check` first)."""
    build_dir = build_dir.resolve()
    stamp = {rel: _stat(build_dir / rel) for rel in (*FILES.values(), ".config")}
    key = "prebuilt-" + hashlib.sha256(json.dumps([str(build_dir), stamp], sort_keys=True).encode()).hexdigest()[:16]
    entry = cache_dir / "kernels" / key
    if (entry / "meta.json").is_file():
        return KernelArtifacts(key, entry, json.loads((entry / "meta.json").read_text()), reused=True)
    meta = {"key": key, "source": f"prebuilt:{build_dir}", "origin": str(build_dir), "version": version,
            "compiler": "", "build_seconds": None, "cold": None, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with atomic_dir(entry) as tmp:
        for name, rel in FILES.items():
            os.symlink(build_dir / rel, tmp / name)
        (tmp / "config").write_bytes((build_dir / ".config").read_bytes())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return KernelArtifacts(key, entry, meta, reused=False)


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]
