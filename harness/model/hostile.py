"""What a hostile host's hypercalls must return, and its randomized mixes (pure: no I/O).

`predict` answers a host/hyp transition on any page from a snapshot's page states: -EPERM for a
page that is not memory (pKVM reads it as NOPAGE for the host) or not in the state the transition
needs, -EBUSY for an unshare of a pinned page, else 0. `Mix` is a seeded sequence of calls a host
could make (share and unshare of its own pages, in any order, and VM lifecycles between them);
`MixModel` follows one and says what each call must return; `shrink` finds the shortest
subsequence that still fails (delta debugging), for the report.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from harness.model.errnos import EBUSY, EINVAL, ENOENT, ENOMEM, EPERM
from harness.model.stage2 import TRANSITIONS, IllegalTransition, PageStates, State

SHARE, UNSHARE, VM = "share", "unshare", "vm"
HYPERCALL = {SHARE: "__pkvm_host_share_hyp", UNSHARE: "__pkvm_host_unshare_hyp"}
TRANSITION = {SHARE: "host_share_hyp", UNSHARE: "host_unshare_hyp"}
# What a VM teardown returns for a handle no VM has, as each version's code says (6.12's
# get_vm_by_handle misses: -ENOENT; 7.x's teardown pair: -EINVAL).
BAD_HANDLE = {"__pkvm_teardown_vm": ENOENT, "__pkvm_start_teardown_vm": EINVAL,
              "__pkvm_finalize_teardown_vm": EINVAL}
# __pkvm_init_vcpu takes the vCPU's memory first and looks the VM up second (6.12, 7.x): a bad
# handle is -ENOENT, and the memory must come back.
INIT_VCPU_BAD_HANDLE = ENOENT
# ... and memory the host cannot donate (not its own) fails that first step: map_donated_memory()
# returns NULL, and __pkvm_init_vcpu() says -ENOMEM, whatever the handle.
INIT_VCPU_NOT_DONATED = ENOMEM


def predict(transition: str, pair: tuple[State, State], *, is_memory: bool = True, pins: int = 0,
            mapped_non_memory_errno: int = EPERM) -> int:
    """The return of `transition` ("host_share_hyp", ...) on one page whose (host, hyp) states
    are `pair`. A page that is not memory is refused -EPERM, or with `mapped_non_memory_errno`
    where the host stage-2 maps it (-EINVAL before KernelVersion.host_state_checks_memory)."""
    if not is_memory:
        return mapped_non_memory_errno
    trial = PageStates({0: pair[0]}, {0: pair[1]}, {0: pins} if pins else {})
    try:
        trial.apply(transition, 0)
    except IllegalTransition as e:
        return EBUSY if "pinned" in str(e) else EPERM
    return 0


@dataclass(frozen=True)
class Step:
    op: str                  # share, unshare (of module page `arg`), or vm (a lifecycle with `arg` vCPUs)
    arg: int

    def __str__(self) -> str:
        return f"vm({self.arg} vCPU)" if self.op == VM else f"{self.op}(page {self.arg})"


def mix(seed: int, pages: int = 4, length: int = 24) -> list[Step]:
    """A seeded mix: shares and unshares of `pages` host pages, right or wrong for their state
    (the host decides, EL2 must refuse what is wrong), and now and then a VM lifecycle."""
    rng = random.Random(seed)
    out = []
    for _ in range(length):
        roll = rng.random()
        if roll < 0.1:
            out.append(Step(VM, rng.randint(1, 2)))
        else:
            out.append(Step(SHARE if roll < 0.55 else UNSHARE, rng.randrange(pages)))
    return out


class MixModel:
    """The module pages' states as a mix leaves them: all start host OWNED / hyp NOPAGE."""

    def __init__(self) -> None:
        self.states = PageStates.empty()

    def apply(self, step: Step) -> int:
        """What the call must return; the states move on where it succeeds."""
        want = predict(TRANSITION[step.op], self.states.view(step.arg))
        if want == 0:
            self.states.apply(TRANSITION[step.op], step.arg)
        return want

    def follow(self, step: Step, ret: int) -> None:
        """Move as the kernel did where it disagreed: a call it let through (0) took effect."""
        if ret == 0 and step.op != VM:
            (_, host), (_, hyp) = TRANSITIONS[TRANSITION[step.op]]
            self.states.host[step.arg], self.states.hyp[step.arg] = host, hyp

    def shared(self) -> list[int]:
        return [p for p, s in self.states.hyp.items() if s == State.SHARED_BORROWED]


def shrink(steps: Sequence[Step], fails: Callable[[list[Step]], bool], budget: int = 64) -> list[Step]:
    """The shortest subsequence of `steps` for which `fails` still holds, by delta debugging
    (ddmin), within `budget` tries. `steps` must fail."""
    current = list(steps)
    n = 2
    tries = 0
    while len(current) >= 2 and tries < budget:
        chunk = max(1, len(current) // n)
        reduced = False
        for start in range(0, len(current), chunk):
            candidate = current[:start] + current[start + chunk:]
            tries += 1
            if candidate and fails(candidate):
                current, n, reduced = candidate, max(n - 1, 2), True
                break
            if tries >= budget:
                break
        if not reduced:
            if chunk == 1:
                break
            n = min(len(current), n * 2)
    return current
