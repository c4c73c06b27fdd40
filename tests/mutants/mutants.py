"""The mutant catalogue (tests/mutants/*.patch) and what a suite run on one of them reported.

A mutant patch opens with a header that `patch` ignores:
    Mutant: <name>
    <what the bug is, a few lines>
    Expect: <regex a failure message must match: the suites point at the bug>
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
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


@dataclass(frozen=True)
class Failure:
    test: str           # e.g. "allocator/test_allocator.py::test_every_invariant_holds_after_boot"
    message: str


def failures(junit_xml: Path) -> tuple[list[Failure], int]:
    """(failed or errored test cases with their messages, number of test cases) from a JUnit file."""
    root = ET.parse(junit_xml).getroot()
    out, total = [], 0
    for case in root.iter("testcase"):
        total += 1
        for bad in [*case.findall("failure"), *case.findall("error")]:
            name = f"{case.get('classname', '').replace('.', '/')}::{case.get('name')}"
            out.append(Failure(name.split("test_suites/", 1)[-1], f"{bad.get('message', '')}\n{bad.text or ''}"))
    return out, total
