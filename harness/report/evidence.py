"""What a failing test leaves behind, as plain JSON-ready dicts (pure: no I/O).

A reader of a nightly report wants four things next to the assertion: what the kernel printed
while the test ran, what changed at EL2 (snapshot before the test against after it), the first
traced allocator call the model disagreed with, and how full each pool was.
"""

from __future__ import annotations

import re
from typing import Any

from harness.el2.pgtable import Leaf
from harness.el2.state import Snapshot, SnapshotDiff

CONSOLE_LINES = 60
EXAMPLES = 8            # s2 leaves / pages quoted per list; the counts are always whole

_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")


# Lines kept before a panic line when the excerpt is centred on it: what led to it.
LEAD_LINES = 10


def console_excerpt(lines: list[str], source: str, max_lines: int = CONSOLE_LINES,
                    focus: str | None = None) -> dict[str, Any]:
    """The last `max_lines` non-empty lines, control characters removed; with `focus` (a panic
    line), the `max_lines` from a few lines before its first appearance: a panic's own trace
    can be longer than the excerpt, and the panic line is what the reader needs."""
    lines = [_CONTROL.sub("", line).rstrip() for line in lines]
    lines = [line for line in lines if line]
    at = next((i for i, line in enumerate(lines) if focus and focus in line), None)
    kept = lines[-max_lines:] if at is None else lines[max(0, at - LEAD_LINES):][:max_lines]
    return {"source": source, "lines": kept, "omitted": len(lines) - len(kept)}


def _leaf(leaf: Leaf) -> str:
    return f"{leaf.addr:#x}+{leaf.size:#x} L{leaf.level} {leaf.describe()}"


def el2_diff(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    d = SnapshotDiff.between(before, after)
    return {
        "empty": d.is_empty(),
        "pools": [{"name": name, "free_pages_delta": p.free_pages_delta, "allocated": len(p.allocated),
                   "freed": len(p.freed), "allocated_examples": [f"{pa:#x}" for pa in p.allocated[:EXAMPLES]],
                   "freed_examples": [f"{pa:#x}" for pa in p.freed[:EXAMPLES]],
                   "free_per_order_delta": {str(k): v for k, v in p.free_per_order_delta.items()}}
                  for name, p in d.pools.items()],
        "pools_added": d.pools_added,
        "pools_removed": d.pools_removed,
        "host_s2": {"added": len(d.s2_added), "removed": len(d.s2_removed), "changed": len(d.s2_changed),
                    "examples": ([f"+ {_leaf(x)}" for x in d.s2_added[:EXAMPLES]]
                                 + [f"- {_leaf(x)}" for x in d.s2_removed[:EXAMPLES]]
                                 + [f"~ {_leaf(a)} -> {b.describe()}" for a, b in d.s2_changed[:EXAMPLES]])},
    }


OCCUPANCY_FIELDS = ("name", "nr_pages", "free_pages", "allocated_pages", "max_order", "free_per_order")


def occupancy(snap: Snapshot) -> list[dict[str, Any]]:
    """Each pool's size and how full it is: the summary fields of Pool.to_dict()."""
    return [{k: v for k, v in p.to_dict().items() if k in OCCUPANCY_FIELDS} for p in snap.pools.values()]


def divergence(replay: Any) -> dict[str, Any] | None:
    """The first divergent operation of a harness.model.replay.ReplayResult, or its final mismatches."""
    if replay is None or replay.ok:
        return None
    out: dict[str, Any] = {"operations": replay.ops, "final_mismatches": list(replay.final_mismatches[:EXAMPLES])}
    d = replay.divergence
    if d is not None:
        out.update(seq=d.seq, pool=d.pool, op=d.op, reason=d.reason, previous=list(d.previous), text=d.render())
    return out
