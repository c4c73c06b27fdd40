"""The mutant catalogue (tests/mutants/*.patch).

A mutant patch opens with a header that `patch` ignores:
    Mutant: <name>
    <what the bug is, a few lines>
    Expect: <regex a failure message must match: the suites point at the bug>
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: Path
    bug: str
    expect: re.Pattern[str]


def catalogue() -> list[Mutant]:
    out = []
    for path in sorted(HERE.glob("*.patch")):
        header = path.read_text().split("\n--- ", 1)[0].splitlines()
        fields = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in header
                  if line.startswith(("Mutant:", "Expect:"))}
        bug = " ".join(line for line in header if not line.startswith(("Mutant:", "Expect:"))).strip()
        out.append(Mutant(fields["Mutant"], path, bug, re.compile(fields["Expect"])))
    return out
