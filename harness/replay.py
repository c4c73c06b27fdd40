"""Replaying traced EL2 allocator calls in the model: a live trace (el2trace's stream, followed as the
machine runs, or a gdbstub trace window), or one saved in a run directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.el2.state import Snapshot
from harness.el2.tcg.probes import Layout
from harness.el2.tcg.stream import Calls, Follower, judge_in_order
from harness.el2.trace import Op, Trace, load, pools_from_json
from harness.errors import UsageError
from harness.model.guest_transitions import GUEST_FUNCTIONS
from harness.model.replay import Divergence, Replayer, ReplayResult, replay
from harness.model.transitions import TransitionChecker, snapshot_states


def pool_names(trace: Trace) -> dict[int, str]:
    names = {p.struct_pa: n for n, p in trace.initial.pools.items()} if trace.initial is not None else {}
    if trace.final is not None:
        names.update({p.struct_pa: n for n, p in trace.final.pools.items()})
    return names


def replay_trace(trace: Trace) -> ReplayResult:
    """Replay a live trace in the model, from its initial snapshot (or power-on) to its final one."""
    start = trace.initial if trace.initial is not None else trace.final
    assert start is not None, "a trace from power-on ends with a snapshot"
    return replay(_pools(trace.initial) if trace.initial is not None else {},
                  trace.ops, _pools(trace.final) if trace.final else None,
                  start.kernel_version, pool_names(trace))


def replay_window(boot: Trace, window: Trace) -> tuple[ReplayResult, list[str]]:
    """A window's calls replayed as the last of every call since power-on (`boot`, which ends with
    them: a board's RingTracer.from_boot), as el2trace's live replay slices them: the model built
    from the pools' inits, compared with the window's first snapshot where the window begins (the
    pools of VMs gone by then dropped there), and with its last at its end. The result counts the
    window's calls and drops only; with it, what already differed when the window began (a
    divergence or the pools' mismatches: then the window is not judged from power-on)."""
    assert window.initial is not None and window.final is not None and len(boot.ops) >= len(window.ops)
    start = len(boot.ops) - len(window.ops)
    replayer = Replayer({}, window.initial.kernel_version, pool_names(window))
    diverged = replayer.feed(boot.ops[:start])
    before = [diverged.render()] if diverged is not None else replayer.compare(_pools(window.initial))
    mark = _mark(replayer)
    final = _pools(window.final)
    after = replayer.compare(final) if replayer.feed(boot.ops[start:], final) is None else []
    return _since(replayer, mark, after), before


def _pools(snapshot: Snapshot) -> dict[int, Any]:
    """A snapshot's pools as the model keys them: by their struct's PA."""
    return {p.struct_pa: p for p in snapshot.pools.values()}


def _mark(replayer: Replayer) -> Mark:
    return Mark(replayer.count, len(replayer.dropped), {k: dict(v) for k, v in replayer.per_pool.items()})


def _since(replayer: Replayer, mark: Mark, mismatches: list[str]) -> ReplayResult:
    """What `replayer` made of the calls since `mark`."""
    per_pool = {pool: diff for pool, counts in replayer.per_pool.items()
                if (diff := {op: n - mark.per_pool.get(pool, {}).get(op, 0) for op, n in counts.items()
                             if n > mark.per_pool.get(pool, {}).get(op, 0)})}
    return ReplayResult(replayer.count - mark.ops, per_pool, replayer.divergence, mismatches,
                        replayer.dropped[mark.dropped:])


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


@dataclass(frozen=True)
class Mark:
    ops: int
    dropped: int
    per_pool: dict[str, dict[str, int]]


class LiveReplay:
    """Every EL2 allocator call of a machine running el2trace, replayed from power-on: each pool is
    built at its hyp_pool_init and never adopted from a snapshot. `poll()` feeds the model what the
    plugin wrote since the last poll. After a divergence the models no longer follow the kernel;
    `take_divergence()` hands it out once, to the test it happened in."""

    def __init__(self, stream: Path, keep_ops: bool = False) -> None:
        layout = Layout.from_json(stream.with_name("el2trace-layout.json").read_text())
        self.ops: list[Op] | None = [] if keep_ops else None       # every op, for `pkvm-harness trace`
        self.stream = stream
        self.follower = Follower(stream)
        self.calls = Calls(layout)
        self.replayer = Replayer({}, layout.kernel_version)
        self.host_calls_total = 0
        self._reported = False
        self.allocated_by: dict[int, Op] = {}     # page PA -> the traced hyp_alloc_pages that returned it
        self.differed_in: str | None = None       # the test whose el2_trace window first found the pools differ
        self.transitions = TransitionChecker(guests_traced=any(f in layout.functions for f in GUEST_FUNCTIONS))

    @property
    def ops_total(self) -> int:
        return self.replayer.count

    def poll(self) -> None:
        ops, host_calls = self.calls.feed(self.follower.new_records())
        if self.ops is not None:
            self.ops += ops
        for op in ops:
            if op.op == "alloc" and op.result is not None:
                for i in range(1 << op.args["order"]):
                    self.allocated_by[op.result + i * 4096] = op
        self.replayer.names.update(self.calls.pool_names())
        self.replayer.feed(ops)
        self.host_calls_total += len(host_calls)
        transitions, self.calls.transitions = self.calls.transitions, []
        judge_in_order(self.transitions, [*transitions, *host_calls])

    def check_transitions(self, snapshot: Snapshot) -> list[str]:
        """Every transition since the last check, judged, and the page states against `snapshot`
        (taken while_paused=poll). The first check only starts the model from `snapshot`."""
        return self.transitions.compare(snapshot_states(snapshot))

    def take_divergence(self) -> Divergence | None:
        if self.replayer.divergence is None or self._reported:
            return None
        self._reported = True
        return self.replayer.divergence

    def mark(self) -> Mark:
        return _mark(self.replayer)

    def compare(self, snapshot: Snapshot) -> list[str]:
        """The models against a snapshot whose instant is the last poll's (taken while_paused)."""
        if self.replayer.divergence is not None:
            return []
        return self.replayer.compare(_pools(snapshot))

    def since(self, mark: Mark, snapshot: Snapshot) -> ReplayResult:
        """What the model made of the calls since `mark`, compared at the end with `snapshot`."""
        return _since(self.replayer, mark, self.compare(snapshot))
