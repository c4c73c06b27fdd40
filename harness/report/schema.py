"""result.json's schema (result.schema.json, beside this file) and its validation."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).with_name("result.schema.json")


@cache
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def problems(result: Any) -> list[str]:
    """Every way `result` breaks the schema, one line each ("" path = the top level); [] if none."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema())
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(result), key=lambda e: list(map(str, e.absolute_path)))]
