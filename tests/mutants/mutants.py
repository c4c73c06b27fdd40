"""The mutant catalogue: tests/mutants/*.patch and tests/mutants/7.x/*.patch.

A mutant patch opens with a header that `patch` ignores:
    Mutant: <name>
    Kernels: <series range the patch is written for: "6.12+", "6.12-7.1", "7.2+">
    Options: <optional: pytest plugin options the mutant's kernel is run with, e.g.
              "--pkvm-el2-debug off" for a bug that upstream's EL2 selftest would catch first>
    Sweep: <optional: a bug on an error path. The suites must miss it (they walk the happy
            path) and `pkvm-harness inject --sweep` over this workload must catch it>
    <what the bug is, a few lines>
    Expect: <regex a failure message must match: the suites point at the bug>
One name may have one patch per range (05 differs between 6.12 and 7.x); `catalogue(kernel)`
picks, for a kernel series, every mutant with a patch for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from harness.kernel.debian import DEFAULT
from harness.kernel.version import KernelVersion

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: Path
    kernels: str
    bug: str
    expect: re.Pattern[str]
    options: tuple[str, ...] = ()
    sweep: str | None = None          # the fault sweep's workload that must catch it


def _read(path: Path) -> Mutant:
    header = path.read_text().split("\n--- ", 1)[0].splitlines()
    keys = ("Mutant:", "Kernels:", "Options:", "Sweep:", "Expect:")
    fields = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in header if line.startswith(keys)}
    bug = " ".join(line for line in header if not line.startswith(keys)).strip()
    return Mutant(fields["Mutant"], path, fields["Kernels"], bug, re.compile(fields["Expect"]),
                  tuple(fields.get("Options", "").split()), fields.get("Sweep"))


def every_patch() -> list[Mutant]:
    return [_read(p) for p in sorted(HERE.glob("*.patch")) + sorted(HERE.glob("*/*.patch"))]


def catalogue(kernel: str | None = None) -> list[Mutant]:
    """The mutants for a kernel series (default: the harness's default kernel): those run with
    the default options first, in name order, then those with Options (a different config is
    a different kernel: grouped, the patched tree is reconfigured once)."""
    version = KernelVersion.parse(kernel or DEFAULT)
    chosen = [m for m in every_patch() if version.in_series_range(m.kernels)]
    names = [m.name for m in chosen]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"two patches of {', '.join(sorted(dupes))} claim Linux {version.series}")
    return sorted(chosen, key=lambda m: (m.options, m.name))
