"""Kernel config fragments: parse, merge, check before and after `olddefconfig`.

The harness starts from `allnoconfig` and merges fragments the way `merge_config.sh -m` does,
then runs `olddefconfig`. Every requested option must survive; combinations known to break pKVM
are refused with the fix named.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from harness import REPO_ROOT
from harness.errors import ConfigError, UsageError
from harness.kernel.version import KernelVersion

FRAGMENTS_DIR = REPO_ROOT / "kernel_configs"
DEFAULT_FRAGMENTS = ("pkvm.config",)
# --el2-debug off: turns pkvm.config's NVHE_EL2_DEBUG back off, as kernels ship.
NO_EL2_DEBUG_FRAGMENT = "pkvm-el2-nodebug.config"
# Applied after pkvm.config when the source is that version: pkvm-<series>.config (pkvm-6.1.config).
VERSION_FRAGMENT = "pkvm-{series}.config"

_SET_RE = re.compile(r"^CONFIG_([A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set\s*$")


@dataclass(frozen=True)
class ConfigOption:
    name: str     # without the CONFIG_ prefix
    value: str    # y, m, n, a number, or a quoted string
    origin: str   # "pkvm.config:12" or "--kconfig"

    def line(self) -> str:
        return f"# CONFIG_{self.name} is not set" if self.value == "n" else f"CONFIG_{self.name}={self.value}"


def parse_option(text: str, origin: str) -> ConfigOption | None:
    """One fragment line -> an option; None for blanks and comments; ConfigError if malformed."""
    line = text.strip()
    if m := _UNSET_RE.match(line):
        return ConfigOption(m.group(1), "n", origin)
    if not line or line.startswith("#"):
        return None
    m = _SET_RE.match(line)
    if not m or not m.group(2):
        raise ConfigError(f"{origin}: cannot parse {line!r}",
                          hint="write CONFIG_NAME=value or '# CONFIG_NAME is not set'")
    value = m.group(2).strip()
    if not (value in ("y", "m", "n") or re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", value)
            or (len(value) >= 2 and value[0] == value[-1] == '"')):
        raise ConfigError(f"{origin}: value {value!r} of CONFIG_{m.group(1)} is not y/m/n, a number "
                          "or a quoted string", hint='quote strings: CONFIG_X="text"')
    return ConfigOption(m.group(1), value, origin)


def parse_fragment(text: str, name: str) -> list[ConfigOption]:
    options = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        opt = parse_option(raw, f"{name}:{lineno}")
        if opt:
            options.append(opt)
    return options


def find_fragment(name: str) -> Path:
    """A --config argument: a path, or a name in kernel_configs/ (with or without .config)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    for candidate in (FRAGMENTS_DIR / name, FRAGMENTS_DIR / f"{name}.config"):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.name for p in FRAGMENTS_DIR.glob("*.config")))
    raise UsageError(f"config fragment {name!r} not found",
                     hint=f"pass a file path or one of kernel_configs/: {known}")


def version_fragments(version: KernelVersion | str | None, el2_debug: bool = True) -> list[str]:
    """The fragments a kernel version adds: the ones its version facts name (an option renamed
    between releases; with EL2 debugging, what hangs off it), then its own series'
    (pkvm-6.1.config for 6.1.192), if there is one."""
    try:
        kv = KernelVersion.of(version) if version else None
    except ValueError:
        kv = None
    if kv is None:
        return []
    name = VERSION_FRAGMENT.format(series=kv.series)
    return kv.config_fragments(el2_debug) + ([name] if (FRAGMENTS_DIR / name).is_file() else [])


def merge(fragments: list[str], kconfig: list[str],
          version: KernelVersion | str | None = None, el2_debug: bool = True) -> dict[str, ConfigOption]:
    """Default fragments, the source version's own, the --el2-debug off one, then --config
    fragments, then --kconfig options; later ones win."""
    merged: dict[str, ConfigOption] = {}
    nodebug = [] if el2_debug else [NO_EL2_DEBUG_FRAGMENT]
    for name in [*DEFAULT_FRAGMENTS, *version_fragments(version, el2_debug), *nodebug, *fragments]:
        path = find_fragment(name)
        for opt in parse_fragment(path.read_text(), path.name):
            merged.pop(opt.name, None)  # re-insert so the text keeps the override order
            merged[opt.name] = opt
    for item in kconfig:
        given = parse_option(item if item.startswith("CONFIG_") else f"CONFIG_{item}", "--kconfig")
        if given is None:
            raise ConfigError(f"--kconfig {item!r} is empty", hint="pass CONFIG_NAME=value")
        merged.pop(given.name, None)
        merged[given.name] = given
    return merged


def fragment_text(requested: dict[str, ConfigOption]) -> str:
    """The canonical merged fragment: part of the build cache key."""
    return "".join(opt.line() + "\n" for opt in requested.values())


def parse_dotconfig(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        if m := _SET_RE.match(line):
            values[m.group(1)] = m.group(2)
        elif m := _UNSET_RE.match(line):
            values[m.group(1)] = "n"
    return values


def apply_fragment(dotconfig: str, requested: dict[str, ConfigOption]) -> str:
    """Textual merge onto a .config, as `merge_config.sh -m` does: drop old lines, append new."""
    kept = []
    for line in dotconfig.splitlines():
        m = _SET_RE.match(line) or _UNSET_RE.match(line)
        if m and m.group(1) in requested:
            continue
        kept.append(line)
    return "\n".join(kept) + "\n" + fragment_text(requested)


# --- Kconfig symbols of a tree --------------------------------------------------------------

@dataclass
class KconfigSymbol:
    name: str
    where: str                 # "arch/arm64/kvm/Kconfig:21"
    depends: list[str]


_CONFIG_DEF_RE = re.compile(r"^\s*(?:menu)?config\s+([A-Za-z0-9_]+)\s*$")
_DEPENDS_RE = re.compile(r"^\s*depends\s+on\s+(.+?)\s*$")


def kconfig_symbols(tree: Path) -> dict[str, KconfigSymbol]:
    """Every symbol defined in the tree's Kconfig files, with its `depends on` lines."""
    symbols: dict[str, KconfigSymbol] = {}
    for root, dirs, files in os.walk(tree):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "Documentation"]
        for fname in files:
            if not fname.startswith("Kconfig"):
                continue
            path = os.path.join(root, fname)
            current: KconfigSymbol | None = None
            with open(path, errors="replace") as f:
                for lineno, line in enumerate(f, 1):
                    if m := _CONFIG_DEF_RE.match(line):
                        rel = os.path.relpath(path, tree)
                        current = symbols.setdefault(m.group(1), KconfigSymbol(m.group(1), f"{rel}:{lineno}", []))
                    elif current and (m := _DEPENDS_RE.match(line)):
                        current.depends.append(m.group(1))
                    elif line.strip() and not line[0].isspace():
                        current = None
    return symbols


def check_known(requested: dict[str, ConfigOption], symbols: dict[str, KconfigSymbol]) -> None:
    """Refuse misspelled or unknown symbols before anything is built."""
    for opt in requested.values():
        if opt.name not in symbols:
            close = difflib.get_close_matches(opt.name, symbols.keys(), n=1, cutoff=0.8)
            hint = (f"did you mean CONFIG_{close[0]}?" if close
                    else "check the spelling against the tree's Kconfig files")
            raise ConfigError(f"{opt.origin}: CONFIG_{opt.name} is not a Kconfig symbol in this kernel tree",
                              hint=hint)


# --- Combinations known to break pKVM -------------------------------------------------------

@dataclass(frozen=True)
class BrokenCombination:
    when: tuple[str, str]
    requires: tuple[str, str]
    why: str

    def violated(self, values: dict[str, str]) -> bool:
        name, value = self.when
        need, need_value = self.requires
        return values.get(name, "n") == value and values.get(need, "n") != need_value

    def message(self) -> str:
        return (f"CONFIG_{self.when[0]}={self.when[1]} without CONFIG_{self.requires[0]}={self.requires[1]} "
                f"is known to break pKVM: {self.why}")

    def fix(self) -> str:
        option = f"CONFIG_{self.requires[0]}={self.requires[1]}"
        return f"add {option} (e.g. --kconfig {option})"


BROKEN_COMBINATIONS = (
    BrokenCombination(
        when=("NVHE_EL2_DEBUG", "y"), requires=("JUMP_LABEL", "y"),
        why="hyp_assert_lock_held() reads the static key kvm_protected_mode_initialized as plain "
            "data EL2 has not mapped, so pKVM init hyp-panics in pkvm_alloc_private_va_range"),
)


def check_combinations(values: dict[str, str], *, explicit_only: bool = False) -> None:
    """Refuse known-broken combinations. With explicit_only, judge only what `values` names
    (before olddefconfig, when unnamed options are not yet known)."""
    for rule in BROKEN_COMBINATIONS:
        if explicit_only and rule.requires[0] not in values:
            continue
        if rule.violated(values):
            raise ConfigError(rule.message(), hint=rule.fix())


def check_survived(requested: dict[str, ConfigOption], final: dict[str, str],
                   symbols: dict[str, KconfigSymbol]) -> None:
    """Every requested option must have its value in the final .config."""
    lost = []
    for opt in requested.values():
        got = final.get(opt.name, "n")
        if got != opt.value:
            sym = symbols.get(opt.name)
            deps = f" (depends on {' && '.join(sym.depends)})" if sym and sym.depends else ""
            lost.append(f"CONFIG_{opt.name}={opt.value} from {opt.origin} became {got}{deps}")
    if lost:
        raise ConfigError(f"{len(lost)} requested option(s) did not survive olddefconfig: " + "; ".join(lost),
                          hint="enable what they depend on, or drop them from the fragment")
