"""A leak named (pure): the pages a pool holds now that it did not hold before, each with what the
snapshot says the kernel uses it for and, from the trace, the call that allocated it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

PAGE = 4096


def held(pool: Any) -> set[int]:
    """Pages of a pool the kernel holds (refcount > 0)."""
    return {pa for pa, (refcount, _) in pool.pages.items() if refcount}


def page_uses(snap: Any) -> dict[int, str]:
    """What each page the snapshot can place is: page-table pages of the host stage-2, the hyp
    stage-1 and each VM's stage-2; a VM's PGD and its pkvm_hyp_vm."""
    uses: dict[int, str] = {}
    walks = (("host stage-2", getattr(snap, "host_s2", None)), ("hyp stage-1", getattr(snap, "hyp_s1", None)))
    for name, walk in walks:
        for pa, level in walk.tables if walk else []:
            uses[pa] = f"a {name} table page (level {level})"
    for vm in getattr(snap, "vms", []):
        who = f"VM {vm.handle:#x}" if vm.handle is not None else f"vm_table[{vm.index}]"
        uses[vm.pa & ~(PAGE - 1)] = f"the pkvm_hyp_vm of {who}"
        for pa, level in vm.s2.tables if getattr(vm, "s2", None) else []:
            uses[pa] = f"a stage-2 table page of {who} (level {level})"
        if vm.pgd_phys is not None:
            uses.setdefault(vm.pgd_phys, f"the stage-2 PGD of {who}")
    return uses


def describe(pages: Iterable[int], snap: Any, allocations: Mapping[int, Any] | None,
             pool_names: Mapping[int, str] | None = None) -> list[str]:
    """One line per page: its use where the snapshot tells, and the traced call that allocated it
    (sequence number, vCPU, order, pool) where a trace has one."""
    uses = page_uses(snap)
    names = pool_names or {}
    out = []
    for pa in sorted(pages):
        line = f"{pa:#x}: {uses.get(pa, 'use not known from the snapshot')}"
        op = (allocations or {}).get(pa)
        if op is not None:
            pool = names.get(op.pool, f"pool@{op.pool:#x}" if op.pool is not None else "?")
            line += f"; allocated by #{op.seq} on vCPU {op.cpu}: hyp_alloc_pages({pool}, order {op.args['order']})"
        elif allocations is not None:
            line += "; no traced allocation returned it"
        out.append(line)
    return out
