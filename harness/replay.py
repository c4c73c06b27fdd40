"""Replaying traced EL2 allocator calls in the model: a live trace, or one saved in a run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.el2.trace import Trace, load, pools_from_json
from harness.errors import UsageError
from harness.model.replay import ReplayResult, replay


def pool_names(trace: Trace) -> dict[int, str]:
    names = {p.struct_pa: n for n, p in trace.initial.pools.items()}
    if trace.final is not None:
        names.update({p.struct_pa: n for n, p in trace.final.pools.items()})
    return names


def replay_trace(trace: Trace) -> ReplayResult:
    """Replay a live trace in the model, from its initial snapshot to its final one."""
    return replay({p.struct_pa: p for p in trace.initial.pools.values()}, trace.ops,
                  {p.struct_pa: p for p in trace.final.pools.values()} if trace.final else None,
                  trace.initial.kernel_version, pool_names(trace))


def replay_saved(path: Path) -> ReplayResult:
    """Replay a saved trace (trace.jsonl or its run directory) offline. Anything that is not a
    saved trace is a UsageError naming the file and what it lacks."""
    if not path.exists():
        raise UsageError(f"{path} does not exist", hint="pass a trace.jsonl or the run directory holding it")
    try:
        ops, initial, final = load(path)
        init_pools = pools_from_json(initial["pools"])
        final_pools = pools_from_json(final["pools"]) if final else None
        version = initial["kernel_version"]
    except FileNotFoundError as e:
        raise UsageError(f"incomplete trace: {e.filename} is missing",
                         hint="a trace directory holds trace.jsonl and snapshot-initial.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not a saved trace: not JSON lines ({e})",
                         hint="pass the trace.jsonl that `pkvm-harness trace` wrote, or its run directory") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UsageError(f"{path} is not a saved trace: {_what(e)}",
                         hint="pass the trace.jsonl that `pkvm-harness trace` wrote, or its run directory") from None
    names = {pa: p.name for pa, p in init_pools.items()}
    if final_pools:
        names.update({pa: p.name for pa, p in final_pools.items()})
    try:
        return replay(init_pools, ops, final_pools, version, names)
    except (KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"{path} is not a saved trace: an operation lacks {_what(e)}",
                         hint="pass the trace.jsonl that `pkvm-harness trace` wrote, or its run directory") from None


def _what(e: Exception) -> str:
    detail: Any = e.args[0] if e.args else type(e).__name__
    return f"no field {detail!r}" if isinstance(e, KeyError) else str(detail)
