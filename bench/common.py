"""What every benchmark script shares: summary statistics, the printed table, the JSON file."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

# Benchmarks run as scripts (python bench/x.py): make the repository importable.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def stats(values: list[float], digits: int = 3) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values)}


def print_table(rows: list[tuple[str, dict, str]]) -> None:
    """rows: (figure name, stats() dict, target text)."""
    width = max(len(name) for name, _, _ in rows) + 2
    print(f"{'figure':{width}} {'median':>10} {'min':>10} {'max':>10} {'n':>3}  target")
    for name, s, target in rows:
        print(f"{name:{width}} {s['median']:>10} {s['min']:>10} {s['max']:>10} {s['n']:>3}  {target}")


def write_json(path: Path, figures: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written {path}")
