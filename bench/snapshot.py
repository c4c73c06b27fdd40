#!/usr/bin/env python3
"""EL2 snapshot benchmark: prints figures, asserts nothing.

  snapshot latency, stop to resume     (target: median <= 150 ms on a 1 GiB guest, >= 10 snapshots)
  first DWARF parse of the vmlinux     (target: <= 10 s)
  cached parse                         (target: <= 100 ms)

Usage: python bench/snapshot.py [--snapshots 10] [--mem 1024] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import pipeline  # noqa: E402
from harness.el2 import symbols  # noqa: E402
from harness.el2.snapshot import El2Reader  # noqa: E402
from harness.image.initramfs import build_initramfs  # noqa: E402
from harness.kernel.build import build  # noqa: E402
from harness.paths import default_cache_dir  # noqa: E402
from harness.targets.qemu_target import QemuTarget  # noqa: E402


def stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1), "n": len(values)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--snapshots", type=int, default=10)
    ap.add_argument("--mem", default="1024")
    ap.add_argument("--json", type=Path, default=Path("bench/results/snapshot.json"))
    a = ap.parse_args()
    cache = default_cache_dir()
    kernel = build(pipeline.build_request(pipeline.KernelOptions(), cache, quiet=True))

    with tempfile.TemporaryDirectory(prefix="pkvm-bench-dwarf-") as scratch:
        t = time.monotonic()
        symbols.load(kernel.vmlinux, Path(scratch))
        first = (time.monotonic() - t) * 1000
        cached = []
        for _ in range(5):
            t = time.monotonic()
            symbols.load(kernel.vmlinux, Path(scratch))
            cached.append((time.monotonic() - t) * 1000)

    with tempfile.TemporaryDirectory(prefix="pkvm-bench-snap-") as run_dir:
        spec = pipeline.qemu_spec(pipeline.BootOptions(mem=a.mem), kernel, build_initramfs(cache), Path(run_dir))
        with QemuTarget(spec, Path(run_dir)) as target, El2Reader(target.qmp_socket, kernel.vmlinux, cache) as r:
            pauses = [r.snapshot().pause_ms for _ in range(a.snapshots)]

    figures = {"guest_mem_mib": int(a.mem), "kernel": kernel.meta["version"],
               "snapshot_pause_ms": stats(pauses), "dwarf_first_parse_ms": round(first),
               "dwarf_cached_parse_ms": stats(cached)}
    print(f"{'figure':32} {'median':>8} {'min':>8} {'max':>8} {'n':>3}  target")
    for name, s, target in (("snapshot pause (ms)", figures["snapshot_pause_ms"], "median <= 150"),
                            ("cached DWARF parse (ms)", figures["dwarf_cached_parse_ms"], "<= 100")):
        print(f"{name:32} {s['median']:8} {s['min']:8} {s['max']:8} {s['n']:3}  {target}")
    print(f"{'first DWARF parse (ms)':32} {figures['dwarf_first_parse_ms']:8}                       <= 10000")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
