"""Harness-only kernel code, brought in by the config symbol that enables it.

A test kernel may carry code no shipping kernel has: the hostile host (harness/kernel/hostile/,
CONFIG_PKVM_HOSTILE_HOST, asked for with `--config pkvm-hostile-host`). When the merged config
asks for such a symbol, `patches_for` writes a patch for this source tree that adds the code, its
Kconfig entry and its Makefile line; the build applies it like a --patch, so the kernel is cached
apart and the default kernel never has the code.
"""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass
from pathlib import Path

from harness.fsutil import atomic_write_text
from harness.kernel.config import ConfigOption

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Overlay:
    symbol: str            # the Kconfig symbol that enables it (without CONFIG_)
    source: Path           # the C file, copied into `directory`
    directory: str         # where in the tree, with its Kconfig and Makefile
    kconfig: str           # the Kconfig entry appended to <directory>/Kconfig

    @property
    def object_line(self) -> str:
        return f"obj-$(CONFIG_{self.symbol}) += {self.source.stem}.o\n"


HOSTILE_HOST = Overlay(
    "PKVM_HOSTILE_HOST", HERE / "hostile" / "pkvm_hostile.c", "arch/arm64/kvm",
    "\nconfig PKVM_HOSTILE_HOST\n"
    "\tbool \"pkvm-harness: a hostile host's hypercall interface in debugfs (test kernels only)\"\n"
    "\tdepends on KVM && DEBUG_FS\n"
    "\thelp\n"
    "\t  Lets user space issue host hypercalls with any arguments. Never enable it in a kernel\n"
    "\t  that runs anything but the pkvm-harness's tests.\n")
OVERLAYS = (HOSTILE_HOST,)


def patches_for(requested: dict[str, ConfigOption], tree: Path, cache_dir: Path) -> list[Path]:
    """The patches that add each overlay the config enables, for this tree (written once, cached
    by content)."""
    return [_patch(o, tree, cache_dir) for o in OVERLAYS
            if (opt := requested.get(o.symbol)) is not None and opt.value == "y"]


def _patch(overlay: Overlay, tree: Path, cache_dir: Path) -> Path:
    diff = "".join([
        *_append(tree, f"{overlay.directory}/Kconfig", overlay.kconfig),
        *_append(tree, f"{overlay.directory}/Makefile", overlay.object_line),
        *difflib.unified_diff([], overlay.source.read_text().splitlines(keepends=True), "/dev/null",
                              f"b/{overlay.directory}/{overlay.source.name}"),
    ])
    digest = hashlib.sha256(diff.encode()).hexdigest()[:16]
    path = cache_dir / "overlays" / f"{overlay.symbol.lower()}-{digest}.patch"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, diff)
    return path


def _append(tree: Path, rel: str, text: str) -> list[str]:
    old = (tree / rel).read_text().splitlines(keepends=True)
    return list(difflib.unified_diff(old, old + text.splitlines(keepends=True), f"a/{rel}", f"b/{rel}"))
