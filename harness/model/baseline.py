"""What a workload left at EL2 once it was torn down, against the baseline before it (pure).

After a VM's teardown EL2 must be where it was: the fixed pools hold the pages they held (the
host stage-2's pool may keep new host stage-2 table pages: the host's idmap grows as it touches
memory, by design), no VM is left in vm_table, every page the hyp owned, shared or borrowed is in
the state it was, and the hyp stage-1 maps nothing new outside its linear map. Each difference is
a `Leftover`, naming the pages and, where the snapshot tells, what each is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.model import leaks
from harness.model.stage2 import in_hyp_linear_map
from harness.model.transitions import snapshot_states

MAX_LINES = 8


@dataclass
class Leftover:
    where: str                        # "hpool", "vm_table", "page states", "hyp stage-1"
    pages: list[int]
    lines: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        more = f"\n    ... and {len(self.lines) - MAX_LINES} more" if len(self.lines) > MAX_LINES else ""
        return f"{self.where}: {len(self.pages)} page(s) left\n    " + "\n    ".join(self.lines[:MAX_LINES]) + more


def leftovers(before: Any, after: Any) -> list[Leftover]:
    """Everything `after` holds at EL2 that `before` did not (both Snapshots, no VM running)."""
    out = _pools(before, after) + _vms(before, after)
    if (states := _page_states(before, after)) is not None:
        out.append(states)
    if (private := _hyp_private(before, after)) is not None:
        out.append(private)
    return out


def _pools(before: Any, after: Any) -> list[Leftover]:
    out = []
    host_tables = {pa for pa, _ in after.host_s2.tables} if after.host_s2 is not None else set()
    for name, pool in before.pools.items():
        if name not in after.pools:
            continue
        kept = leaks.held(after.pools[name]) - leaks.held(pool)
        if name == "host_s2_pool":
            kept -= host_tables
        if kept:
            out.append(Leftover(name, sorted(kept), leaks.describe(kept, after, None)))
    return out


def _vms(before: Any, after: Any) -> list[Leftover]:
    known = {vm.pa for vm in before.vms}
    left = [vm for vm in after.vms if vm.pa not in known]
    return [Leftover("vm_table", [vm.pa for vm in left],
                     [f"vm_table[{vm.index}]: VM {vm.handle:#x} at {vm.pa:#x}" if vm.handle is not None
                      else f"vm_table[{vm.index}] at {vm.pa:#x}" for vm in left])] if left else []


def _page_states(before: Any, after: Any) -> Leftover | None:
    """Pages the hyp owns, shares or borrows in either snapshot whose states differ."""
    try:
        was, now = snapshot_states(before), snapshot_states(after)
    except ValueError as e:
        return Leftover("page states", [], [f"could not be compared: {e}"])
    changed = []
    for pa in sorted(set(was.hyp_pages) | set(now.hyp_pages)):
        a, b = was.view(pa), now.view(pa)
        if a != b:
            changed.append((pa, a, b))
    if not changed:
        return None
    uses = leaks.page_uses(after)
    return Leftover("page states", [pa for pa, _, _ in changed],
                    [f"{pa:#x}: host {a[0].value} / hyp {a[1].value} -> host {b[0].value} / hyp {b[1].value}"
                     + (f" ({uses[pa]})" if pa in uses else "") for pa, a, b in changed])


def _hyp_private(before: Any, after: Any) -> Leftover | None:
    """Pages the hyp stage-1 maps outside its linear map (stacks, fixmap, private mappings) that
    it did not before."""
    for name, snap in (("before", before), ("after", after)):
        missing = "hyp_s1" if snap.hyp_s1 is None else "hyp_physvirt_offset" if snap.hyp_physvirt_offset is None \
            else None
        if missing:             # not read is not clean
            return Leftover("hyp stage-1", [], [f"could not be compared: the snapshot {name} has no {missing} "
                                                 f"({snap.unavailable.get(missing, 'not read')})"])

    def private(snap: Any) -> set[tuple[int, int]]:
        return {(leaf.addr, leaf.pa) for leaf in snap.hyp_s1.leaves
                if leaf.valid and not in_hyp_linear_map(leaf, snap.hyp_physvirt_offset)}

    new = sorted(private(after) - private(before))
    if not new:
        return None
    return Leftover("hyp stage-1", [pa for _, pa in new], [f"hyp VA {va:#x} -> {pa:#x}" for va, pa in new])
