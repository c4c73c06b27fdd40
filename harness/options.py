"""The kernel and boot options, declared once.

Each option is declared here with its type, default, spelling and help; `add_to_argparse` puts the
declaration into a CLI command and `add_to_pytest` into the pytest plugin (as `--pkvm-<name>`),
so the two cannot drift apart. `KernelOptions` and `BootOptions` are what the rest of the harness
takes; `to_argv` turns them back into plugin arguments for a child pytest (the bisect runner).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from harness.kernel import debian
from harness.paths import default_cache_dir

PLUGIN_PREFIX = "--pkvm-"
PKVM_MODES = {"nvhe": "nVHE", "hvhe": "hVHE"}     # the option's spelling -> the kernel's spelling
_MEM_RE = re.compile(r"(\d+)([MG]?)", re.IGNORECASE)


def mem_size(text: str) -> str:
    """QEMU's -m: MiB, or with an M or G suffix (at least 256 MiB: pKVM reserves its carveout)."""
    m = _MEM_RE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size; give MiB (1024) or a size with M or G (2G)")
    mib = int(m.group(1)) * (1024 if m.group(2).upper() == "G" else 1)
    if mib < 256:
        raise argparse.ArgumentTypeError(f"{text} is too little memory for a pKVM host; give at least 256 (MiB)")
    return text.strip()


def mib(text: str) -> int:
    """A mem_size() string in MiB."""
    m = _MEM_RE.fullmatch(text.strip())
    assert m, text
    return int(m.group(1)) * (1024 if m.group(2).upper() == "G" else 1)


def ram_regions(text: str) -> str:
    """--ram-regions: two or more sizes (MiB, or with M or G), each a NUMA node of its own: Linux
    keeps them as separate memblocks, so pKVM's hyp_memory has one region per node."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) < 2 or not all(_MEM_RE.fullmatch(p) for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of RAM region sizes; "
                                         "give two or more, e.g. 768M,640M")
    if sum(mib(p) for p in parts) < 256:
        raise argparse.ArgumentTypeError(f"{text} is too little memory for a pKVM host; "
                                         "give at least 256 (MiB) in all")
    return ",".join(parts)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be more than 0 seconds")
    return value


def pkvm_mode(text: str) -> str:
    """nvhe/hvhe (any case) -> the mode as the kernel prints it (nVHE/hVHE)."""
    try:
        return PKVM_MODES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a pKVM mode; use nvhe or hvhe") from None


@dataclass(frozen=True)
class Option:
    """One option: `dest` is its field in KernelOptions/BootOptions; the flag is --<name>."""

    name: str
    dest: str
    help: str
    type: Callable[[str], Any] | None = str
    default: Any = None
    repeat: bool = False              # action="append"
    flag: bool = False                # action="store_true"
    choices: Sequence[str] | None = None
    metavar: str | None = None
    short: str | None = None          # the CLI's short form (-j); the plugin has none

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"dest": self.dest, "help": self.help}
        if self.flag:
            kw.update(action="store_true", default=False)
            return kw
        if self.repeat:
            kw.update(action="append", default=[])
        else:
            kw["default"] = self.default
        if self.type is not None and self.type is not str:
            kw["type"] = self.type
        if self.choices:
            kw["choices"] = list(self.choices)
        if self.metavar:
            kw["metavar"] = self.metavar
        return kw


KERNEL = (
    Option("kernel-src", "kernel_src", "kernel tree (git or plain) or source tarball; default: Debian's "
           "linux-source of --kernel", type=Path, metavar="PATH"),
    Option("kernel", "kernel", "Debian's linux-source-X.Y: " + ", ".join(debian.SOURCES)
           + f" (default {debian.DEFAULT}; the 7.x ones are fetched once from their Debian suite)",
           choices=tuple(debian.SOURCES), metavar="X.Y"),
    Option("kernel-build", "kernel_build", "use a kernel you built (its O= directory with Image, vmlinux and "
           ".config) instead of building one; refused if pKVM's options are missing", type=Path, metavar="DIR"),
    Option("config", "fragments", "extra config fragment: a path or a name in kernel_configs/ (repeatable; "
           "pkvm.config is always applied first)", repeat=True, metavar="FRAGMENT"),
    Option("el2-debug", "el2_debug", "pKVM's EL2 debugging (NVHE_EL2_DEBUG: EL2 BUG lines, stack trace, and on "
           "7.x the ownership selftest and trace remote): on, as the suites expect, or off, as kernels ship "
           "(default: %(default)s)", choices=("on", "off"), default="on"),
    Option("kconfig", "kconfig", "one extra config option, applied last (repeatable)", repeat=True,
           metavar="CONFIG_X=y"),
    Option("patch", "patches", "apply a patch (-p1) to a copy of the kernel source before building (repeatable)",
           type=Path, repeat=True, metavar="FILE"),
    Option("cross-compile", "cross_compile", "cross toolchain prefix (default: %(default)s)",
           default="aarch64-linux-gnu-", metavar="PREFIX"),
    Option("jobs", "jobs", "make jobs (default: one per core)", type=positive_int, metavar="N", short="-j"),
    Option("build-timeout", "build_timeout", "deadline for one kernel build (default: %(default)s)",
           type=positive_float, default=3600.0, metavar="SECONDS"),
)

BOOT = (
    Option("cpu", "cpu", "QEMU -cpu: max gives hVHE, cortex-a72 gives nVHE (default: %(default)s)", default="max"),
    Option("smp", "smp", "vCPUs of the pKVM host (default: %(default)s)", type=positive_int, default=2, metavar="N"),
    Option("mem", "mem", "QEMU -m: MiB, or with M or G (default: %(default)s)", type=mem_size, default="1024",
           metavar="SIZE"),
    Option("ram-regions", "ram_regions", "RAM as several regions, one NUMA node each, e.g. 768M,640M (QEMU -m is "
           "their sum; --mem is then ignored)", type=ram_regions, metavar="SIZES"),
    Option("append", "append", "extra kernel command-line arguments (repeatable)", repeat=True, metavar="ARGS"),
    Option("qemu", "qemu", "QEMU binary (default: %(default)s)", default="qemu-system-aarch64", metavar="PATH"),
    Option("qemu-arg", "qemu_args", "extra QEMU argument (repeatable; use --qemu-arg=-foo for dashes)",
           repeat=True, metavar="ARG"),
    Option("boot-timeout", "boot_timeout", "deadline from QEMU start to the shell (default: %(default)s)",
           type=positive_float, default=120.0, metavar="SECONDS"),
    Option("expect-mode", "expect_mode", "fail unless pKVM comes up in this mode: nvhe or hvhe (default: any; "
           "the boot suite then expects what the CPU and kernel give)", type=pkvm_mode, metavar="MODE"),
    Option("el2-plugin", "el2_plugin", "the el2trace TCG plugin from power-on (every EL2 allocator call and "
           "hypercall, replayed; EL2 block coverage): auto (on when this QEMU can run it, 9.1+), on (refuse "
           "a QEMU that cannot), off (default: %(default)s)", choices=("auto", "on", "off"), default="auto"),
)

CACHE = Option("cache-dir", "cache_dir", "kernel sources, builds and images (default: %(default)s; "
               "env PKVM_HARNESS_CACHE)", type=Path, default=default_cache_dir(), metavar="DIR")

ALL = (*KERNEL, *BOOT, CACHE)


@dataclass
class KernelOptions:
    kernel_src: Path | None = None
    kernel: str | None = None          # a series of harness.kernel.debian.SOURCES
    kernel_build: Path | None = None   # a developer's own O= directory: used, not built
    fragments: list[str] = field(default_factory=list)
    el2_debug: str = "on"              # "off": kernel_configs/pkvm-el2-nodebug.config
    kconfig: list[str] = field(default_factory=list)
    patches: list[Path] = field(default_factory=list)
    cross_compile: str = "aarch64-linux-gnu-"
    jobs: int | None = None
    build_timeout: float = 3600.0


@dataclass
class BootOptions:
    cpu: str = "max"
    smp: int = 2
    mem: str = "1024"
    ram_regions: str | None = None     # "768M,640M": one NUMA node per size
    append: list[str] = field(default_factory=list)
    qemu: str = "qemu-system-aarch64"
    qemu_args: list[str] = field(default_factory=list)
    boot_timeout: float = 120.0
    expect_mode: str | None = None     # "nVHE" or "hVHE"
    el2_plugin: str = "auto"           # harness/el2/tcg: "on", "off", or "auto" (on when QEMU can)


# A bisect builds the tree under test at each step: the options that choose another source do not apply.
SOURCE_CHOICE = ("kernel-src", "kernel", "kernel-build")


def add_to_argparse(parser: argparse.ArgumentParser, *, kernel: bool = True, boot: bool = True,
                    cache: bool = True, exclude: Sequence[str] = ()) -> None:
    groups = [("kernel", KERNEL if kernel else ()), ("boot", BOOT if boot else ())]
    for title, options in groups:
        if options:
            g = parser.add_argument_group(title)
            for o in options:
                if o.name not in exclude:
                    g.add_argument(*([o.short] if o.short else []), f"--{o.name}", **o.kwargs())
    if cache:
        parser.add_argument(f"--{CACHE.name}", **CACHE.kwargs())


def add_to_pytest(group: Any) -> None:
    """Every option as --pkvm-<name> into a pytest option group (pytest's %(default)s is not expanded)."""
    for o in ALL:
        kw = o.kwargs()
        kw["help"] = kw["help"].replace("%(default)s", str(o.default))
        kw["dest"] = "pkvm_" + o.dest
        group.addoption(f"{PLUGIN_PREFIX}{o.name}", **kw)


_UNSET = object()


def _pick(cls: type, get: Callable[[str], Any]) -> Any:
    """An options dataclass from a getter; a field the command does not declare keeps its default."""
    values = {f.name: get(f.name) for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if v is not _UNSET})


def kernel_options(ns: argparse.Namespace) -> KernelOptions:
    return _pick(KernelOptions, lambda name: getattr(ns, name, _UNSET))


def boot_options(ns: argparse.Namespace) -> BootOptions:
    return _pick(BootOptions, lambda name: getattr(ns, name, _UNSET))


def from_pytest(config: Any) -> tuple[KernelOptions, BootOptions, Path]:
    """The options of a pytest session that asked for the harness (config.getoption by dest)."""
    def get(name: str) -> Any:
        return config.getoption("pkvm_" + name)
    return _pick(KernelOptions, get), _pick(BootOptions, get), get("cache_dir")


def to_argv(kopts: KernelOptions, bopts: BootOptions, cache_dir: Path, prefix: str = PLUGIN_PREFIX) -> list[str]:
    """The options as arguments (the plugin's by default) that give the same values back; only
    those that differ from their default are written."""
    values = {**vars(kopts), **vars(bopts), "cache_dir": cache_dir}
    argv: list[str] = []
    for o in ALL:
        value = values[o.dest]
        if o.flag:
            argv += [f"{prefix}{o.name}"] if value else []
        elif o.repeat:
            argv += [f"{prefix}{o.name}={v}" for v in value]
        elif value is not None and value != o.default:
            shown = next((k for k, v in PKVM_MODES.items() if v == value), value) if o.dest == "expect_mode" \
                else value
            argv.append(f"{prefix}{o.name}={shown}")
    return argv


def parse_argv(argv: list[str]) -> tuple[KernelOptions, BootOptions]:
    """The inverse of to_argv(prefix="--"): arguments saved in a state file, back to options."""
    p = argparse.ArgumentParser(add_help=False)
    add_to_argparse(p)
    ns = p.parse_args(argv)
    return kernel_options(ns), boot_options(ns)


def names(options: Iterable[Option] = ALL) -> list[str]:
    return [o.name for o in options]
