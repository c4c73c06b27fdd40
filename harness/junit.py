"""Failed test cases and their messages from a pytest JUnit XML file (pure)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Failure:
    test: str           # e.g. "allocator/test_allocator::test_every_invariant_holds_after_boot"
    message: str


def failures(junit_xml: Path) -> tuple[list[Failure], int]:
    """(failed or errored test cases with their messages, number of test cases)."""
    root = ET.parse(junit_xml).getroot()
    out, total = [], 0
    for case in root.iter("testcase"):
        total += 1
        for bad in [*case.findall("failure"), *case.findall("error")]:
            name = f"{case.get('classname', '').replace('.', '/')}::{case.get('name')}"
            out.append(Failure(name.split("test_suites/", 1)[-1], f"{bad.get('message', '')}\n{bad.text or ''}"))
    return out, total
