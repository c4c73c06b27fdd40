"""`pkvm-harness inspect`: boot (or attach), snapshot EL2, and show what it holds as tables a person
reads (or JSON, or a picture)."""

from __future__ import annotations

from pathlib import Path

from harness import rundir
from harness.el2.state import Snapshot
from harness.machine import MachineRequest, assemble
from harness.options import BootOptions, KernelOptions


def human(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (exact when it can be)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:g} {unit}" if value == int(value) else f"{value:.2f} {unit}"
    return f"{n} B"


def render_text(snap: Snapshot) -> str:
    lines = [f"EL2 snapshot of Linux {snap.kernel_version}: vCPUs paused {snap.pause_ms} ms "
             f"(attempt {snap.attempts})"]
    if snap.carveout:
        lines.append(f"hyp carveout {snap.carveout[0]:#x} + {human(snap.carveout[1])}; "
                     f"hyp_physvirt_offset {snap.hyp_physvirt_offset:#x}")
    for base, size, flags in snap.memblocks:
        lines.append(f"memblock {base:#x}-{base + size:#x} ({human(size)}) flags {flags:#x}")
    lines.append("")
    width = max([len(n) for n in snap.pools] + [4])
    orders = max([p.max_order for p in snap.pools.values()] + [0])
    lines.append(f"{'pool':<{width}}  {'range':<23} {'pages':>6} {'free':>6} {'alloc':>6}  "
                 f"free blocks per order 0..{orders}")
    for name, p in snap.pools.items():
        per = " ".join(f"{p.free_per_order().get(k, 0):>3}" for k in range(orders + 1))
        lines.append(f"{name:<{width}}  {p.range_start:#x}-{p.range_end:#x} {p.nr_pages:>6} "
                     f"{p.free_pages:>6} {p.allocated_pages:>6}  {per}")
        for err in p.list_errors:
            lines.append(f"{'':<{width}}  ! {err}")
    for vm in snap.vms:
        lines.append(f"VM slot {vm.index}: handle {vm.handle:#x}, {vm.nr_vcpus} vCPUs at EL2, "
                     f"stage-2 PGD {vm.pgd_phys:#x}, pool {vm.pool.name if vm.pool else '-'}")
    if snap.host_s2 and snap.host_s2_root:
        pgd, ia, sl = snap.host_s2_root
        s = snap.s2_summary()
        lines += ["", f"host stage-2: {ia}-bit IPA, start level {sl}, root {pgd:#x}"
                      f"{', LPA2' if snap.lpa2 else ''}, {len(snap.host_s2.tables)} table pages"]
        for kind, size in sorted(s["bytes_by_kind"].items()):
            lines.append(f"  {kind:<10} {human(size):>10}")
        lines.append("  leaves: " + ", ".join(f"{human(sz)} x{n}" for sz, n in s["leaves_by_size"].items()))
        for err in snap.host_s2.errors:
            lines.append(f"  ! {err}")
    if snap.hyp_s1:
        lines.append(f"hyp stage-1: {len(snap.hyp_s1.leaves)} leaves in {len(snap.hyp_s1.tables)} table pages")
    for part, why in snap.absent.items():
        lines.append(f"not in this kernel: {part}: {why}")
    for part, why in snap.unavailable.items():
        lines.append(f"unavailable: {part}: {why}")
    return "\n".join(lines)


def inspect_booted(kopts: KernelOptions, bopts: BootOptions, cache_dir: Path, runs_dir: Path,
                   before: str | None = None, quiet: bool = False) -> Snapshot:
    """Boot a QEMU target (with the guest payloads), optionally run a command, snapshot EL2."""
    from harness.el2.snapshot import El2Reader

    request = MachineRequest.check(kopts, bopts, cache_dir, quiet=quiet)
    run_dir = rundir.create(runs_dir)
    with assemble(request, run_dir).start(run_dir) as target:
        if before:
            target.run(before, timeout=300).check()
        with El2Reader(target.qmp_socket, target.vmlinux, cache_dir) as reader:
            return reader.snapshot()
