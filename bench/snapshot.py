#!/usr/bin/env python3
"""EL2 snapshot benchmark: prints figures, asserts nothing.

  snapshot latency, stop to resume     (target: median <= 150 ms on a 1 GiB guest, >= 10 snapshots)
  first DWARF parse of the vmlinux     (target: <= 10 s)
  cached parse                         (target: <= 100 ms)

Usage: python bench/snapshot.py [--snapshots 10] [--mem 1024] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import print_table, stats, write_json  # noqa: E402  (also puts the repo on sys.path)

from harness import pipeline  # noqa: E402
from harness.el2 import symbols  # noqa: E402
from harness.el2.snapshot import El2Reader  # noqa: E402
from harness.image.initramfs import build_initramfs  # noqa: E402
from harness.kernel.build import build  # noqa: E402
from harness.paths import default_cache_dir  # noqa: E402
from harness.targets.qemu_target import QemuTarget  # noqa: E402


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
               "snapshot_pause_ms": stats(pauses, 1), "dwarf_first_parse_ms": round(first),
               "dwarf_cached_parse_ms": stats(cached, 1)}
    print_table([("snapshot pause (ms)", figures["snapshot_pause_ms"], "median <= 150"),
                 ("cached DWARF parse (ms)", figures["dwarf_cached_parse_ms"], "<= 100")])
    print(f"first DWARF parse (ms): {figures['dwarf_first_parse_ms']}; target <= 10000")
    write_json(a.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
