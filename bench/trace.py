#!/usr/bin/env python3
"""EL2 tracing benchmark: prints figures, asserts nothing.

  cost of one traced operation = (traced - untraced wall time) / operations   (target: <= 5 ms)
  traced / untraced wall time of the VM lifecycle workload                     (target: <= 3x)

Usage: python bench/trace.py [--runs 5] [--workload CMD] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import print_table, stats, write_json  # noqa: E402  (also puts the repo on sys.path)

from harness import pipeline  # noqa: E402
from harness.el2.snapshot import El2Reader  # noqa: E402
from harness.el2.trace import Tracer  # noqa: E402
from harness.image.initramfs import build_initramfs  # noqa: E402
from harness.image.payloads import GUEST_DIR, build_payloads  # noqa: E402
from harness.kernel.build import build  # noqa: E402
from harness.paths import default_cache_dir  # noqa: E402
from harness.targets.qemu import socket_path  # noqa: E402
from harness.targets.qemu_target import QemuTarget  # noqa: E402

WORKLOAD = f"{GUEST_DIR}/pkvm_guest --vms 2 --vcpus 3 --pages 16"




def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workload", default=WORKLOAD)
    ap.add_argument("--json", type=Path, default=Path("bench/results/trace.json"))
    a = ap.parse_args()
    cache = default_cache_dir()
    req = pipeline.build_request(pipeline.KernelOptions(), cache, quiet=True)
    kernel = build(req)
    initramfs = build_initramfs(cache, build_payloads(req, kernel))
    untraced, traced, per_op, ops = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="pkvm-bench-trace-") as tmp:
        run_dir = Path(tmp)
        spec = replace(pipeline.qemu_spec(pipeline.BootOptions(), kernel, initramfs, run_dir),
                       gdb_socket=socket_path(run_dir, "gdb.sock"))
        with QemuTarget(spec, run_dir) as target, El2Reader(target.qmp_socket, kernel.vmlinux, cache) as reader:
            for _ in range(a.runs):
                t = time.monotonic()
                target.run(a.workload, timeout=300).check()
                plain = time.monotonic() - t
                with Tracer(reader, spec.gdb_socket) as tracer:
                    tracer.start()
                    t = time.monotonic()
                    target.run(a.workload, timeout=600).check()
                    with_trace = time.monotonic() - t
                    trace = tracer.stop()
                untraced.append(plain)
                traced.append(with_trace)
                ops.append(len(trace.ops))
                per_op.append((with_trace - plain) * 1000 / max(1, len(trace.ops)))
    ratios = [t / u for t, u in zip(traced, untraced)]
    figures = {"workload": a.workload, "untraced_s": stats(untraced), "traced_s": stats(traced),
               "operations": stats([float(x) for x in ops], 0), "cost_per_op_ms": stats(per_op, 2),
               "traced_over_untraced": stats(ratios, 2)}
    print_table([("untraced workload (s)", figures["untraced_s"], ""),
                 ("traced workload (s)", figures["traced_s"], ""),
                 ("allocator calls traced", figures["operations"], ""),
                 ("cost of one traced op (ms)", figures["cost_per_op_ms"], "<= 5"),
                 ("traced / untraced", figures["traced_over_untraced"], "<= 3")])
    write_json(a.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
