"""A hostile host's randomized mix, run on a target and judged after every step.

Each step is a hypercall with a module page (harness.targets.hostile) or a VM lifecycle through
KVM. After each, its return must be the model's (harness.model.hostile) and, when checks are on,
a fresh snapshot must show every module page in the model's state and every invariant holding
(the caller's `snapshot` may also run the transition oracle, as the suites do). A failing mix
is shrunk to the shortest subsequence that still fails, each try on fresh pages.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import takewhile
from typing import Any

from harness.model.errnos import errno_name
from harness.model.hostile import HYPERCALL, UNSHARE, VM, MixModel, Step, shrink
from harness.model.invariants import render, run_checks
from harness.model.stage2 import State
from harness.model.transitions import snapshot_states
from harness.targets.hostile import Block, HostileHost

PAGES = 4


@dataclass
class MixOutcome:
    steps: list[Step]
    failed_at: int | None = None          # the step that failed
    finding: str = ""
    hypercalls: int = 0
    seconds: float = 0.0
    shortest: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed_at is None


def run_mix(host: HostileHost, steps: Sequence[Step], guest: Callable[[int], str],
            snapshot: Callable[[], Any] | None) -> MixOutcome:
    """Run `steps` on fresh module pages; stop at the first wrong return or finding. `guest(k)`
    is the command for a VM lifecycle with k vCPUs; `snapshot` None runs without the checks."""
    out = MixOutcome(list(steps))
    blocks = host.alloc(PAGES)
    model = MixModel()
    started = time.monotonic()
    try:
        i = 0
        while i < len(steps):
            if steps[i].op == VM:
                host.target.run(guest(steps[i].arg), timeout=300).check()
                i += 1
                continue
            # checked: one call, then a snapshot; unchecked: every call up to the next VM in one write
            batch = [steps[i]] if snapshot is not None else list(takewhile(lambda s: s.op != VM, steps[i:]))
            results = host.calls([(HYPERCALL[s.op], blocks[s.arg].pfn) for s in batch])
            out.hypercalls += len(batch)
            for j, (step, got) in enumerate(zip(batch, results, strict=True)):
                want = model.apply(step)
                finding = (f"{HYPERCALL[step.op]}(page {step.arg}) returned {errno_name(got.ret)}, the model "
                           f"predicts {errno_name(want)}") if got.ret != want else ""
                if finding:        # follow the kernel's effect and the batch's later calls: pages released right
                    for later, ret in [(step, got.ret), *((s, r.ret) for s, r in zip(batch[j + 1:], results[j + 1:]))]:
                        model.follow(later, ret)
                elif snapshot is not None:
                    finding = _check(snapshot(), model, blocks)
                if finding:
                    out.failed_at, out.finding = i + j, f"step {i + j} {step}: {finding}"
                    return out
            i += len(batch)
    finally:
        out.seconds = time.monotonic() - started
        _release(host, model, blocks)
    return out


def _check(snap: Any, model: MixModel, blocks: list[Block]) -> str:
    findings = run_checks(snap)
    if findings:
        return "invariants broken:\n" + render(findings)
    states = snapshot_states(snap)
    wrong = [f"page {i} ({b.pa:#x}): expected host {want[0].value} / hyp {want[1].value}, saw host "
             f"{seen[0].value} / hyp {seen[1].value}"
             for i, b in enumerate(blocks) for want, seen in [(model.states.view(i), states.state(b.pa))]
             if want != seen]
    return "; ".join(wrong)


def _release(host: HostileHost, model: MixModel, blocks: list[Block]) -> None:
    """Unshare what the model says is shared, then give the pages back; a page EL2 still holds
    (the run went wrong) is kept by the module rather than freed under the hyp."""
    for i in model.shared():
        if host.call(HYPERCALL[UNSHARE], blocks[i].pfn).ret == 0:
            model.apply(Step(UNSHARE, i))
    for i, b in enumerate(blocks):
        if model.states.view(i) == (State.OWNED, State.NOPAGE):
            host.free(b)


def shortest(host: HostileHost, outcome: MixOutcome, guest: Callable[[int], str],
             snapshot: Callable[[], Any] | None) -> list[Step]:
    """The shortest prefix-subsequence of a failing mix that still fails, each try on fresh pages."""
    assert outcome.failed_at is not None
    failing = outcome.steps[:outcome.failed_at + 1]
    return shrink(failing, lambda cand: not run_mix(host, cand, guest, snapshot).ok)
