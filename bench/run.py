#!/usr/bin/env python3
"""How fast the harness is, against what a developer would use instead, in one run on one machine.

Prints one table (median, min, max, n of every figure; each target beside it) and writes
bench/results/run.json. With --docs it also rewrites the figures in docs/benchmarks.md and the
scaling plot docs/benchmarks-scaling.png. Nothing here asserts: benchmarks report.

Sections (all by default; --only a,b to pick):
  setup     a new Python environment from scratch (ci/setup.sh --python-only, no pip cache)
  build     cold (recorded in the cache, or --cold-builds N now), warm with no change, after
            touching nvhe/page_alloc.c
  boot      QEMU start to pKVM initialized and to the ready marker; the harness against bare QEMU
  suite     the default (nightly) suites' wall time
  kunit     time to the first test verdict: the harness against KUnit's kunit.py (same tree)
  el2       snapshot latency, the cost of one traced operation, the model's ops/s
  el2trace  the TCG plugin: a workload with and without it, the suites with tracing, replay and
            coverage against none of them, boot to pKVM on QEMU 10 against QEMU 7.2
  oracle    the default suites, and the share of them the after-test checks take (invariants on a
            fresh snapshot, the page-state transitions) after every EL2 suite test
  errors    a full fault sweep of a 1-vCPU lifecycle (runs, wall time); the hostile host's random
            mix, hypercalls per second with the after-step checks and without
  bisect    time per bisect step (the nine-commit history of tests/integration/kernel_history.py)
  scaling   snapshot time and model replay time against guest memory and traced operations

Usage: python bench/run.py [--runs 5] [--only SECTIONS] [--cold-builds N] [--docs] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import measure  # noqa: E402
from common import ROOT, stats  # noqa: E402  (also puts the repo on sys.path)

from harness.kernel.build import build  # noqa: E402
from harness.machine import build_request  # noqa: E402
from harness.options import KernelOptions  # noqa: E402
from harness.paths import default_cache_dir  # noqa: E402
from harness.targets.qemu_debian12 import qemu_7_2  # noqa: E402

SECTIONS = ["setup", "build", "boot", "suite", "kunit", "el2", "el2trace", "oracle", "errors", "boards", "bisect",
            "scaling"]
MEMORY_MIB = ["512", "1024", "2048", "4096"]
MODEL_OPS = [1_000, 10_000, 100_000, 1_000_000]


class Figures:
    """Rows of (section, name, stats, unit, target) plus the raw extras for the JSON."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.extra: dict = {}

    def add(self, section: str, name: str, values: list[float], unit: str, target: str = "",
            digits: int = 3, note: str = "") -> dict:
        row = {"section": section, "name": name, "unit": unit, "target": target, "note": note,
               **stats(values, digits)}
        self.rows.append(row)
        print(f"  {name}: {row['median']} {unit} (min {row['min']}, max {row['max']}, n {row['n']})", flush=True)
        return row

    def ratio(self, section: str, name: str, num: list[float], den: list[float], target: str = "") -> dict:
        """The ratio of the medians, and per-pair ratios for its spread (same run, same machine)."""
        pairs = [a / b for a, b in zip(num, den)]
        row = self.add(section, name, pairs, "x", target, digits=2)
        row["ratio_of_medians"] = round(statistics.median(num) / statistics.median(den), 2)
        return row


def machine() -> dict:
    qemu = subprocess.run(["qemu-system-aarch64", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    mem_kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")))
    os_name = next((line.split("=", 1)[1].strip('"') for line in Path("/etc/os-release").read_text().splitlines()
                    if line.startswith("PRETTY_NAME")), platform.system())
    return {"cpu": cpu, "cores": __import__("os").cpu_count(), "memory_gib": round(mem_kib / 2**20, 1),
            "os": os_name, "qemu": qemu, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="samples per figure (default 5)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"sections, comma-separated: {','.join(SECTIONS)}")
    ap.add_argument("--cold-builds", type=int, default=0,
                    help="measure N cold builds now (about 10 min each on 2 cores); default: the cache's record")
    ap.add_argument("--docs", action="store_true", help="rewrite docs/benchmarks.md's figures and its plot")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "run.json")
    a = ap.parse_args()
    only = [s for s in a.only.split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        print(f"bench/run.py: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2

    cache = default_cache_dir()
    kernel = build(build_request(KernelOptions(), cache))
    f = Figures()
    f.extra["machine"] = machine()
    f.extra["kernel"] = kernel.meta["version"]
    n = a.runs
    started = time.monotonic()

    if "setup" in only:
        print("setup", flush=True)
        f.add("setup", "new Python environment (venv + pinned packages, no pip cache)",
              measure.setup_python_env(n), "s", note="apt's part is not repeatable here (installed)")
    if "build" in only:
        print("build", flush=True)
        cold = measure.cold_build_now(cache, a.cold_builds) if a.cold_builds else measure.recorded_cold_builds(cache)
        if cold:
            f.add("build", "kernel build, cold", cold, "s", "<= 360",
                  note="measured now" if a.cold_builds else "recorded cold builds in the cache (various configs)")
        f.add("build", "kernel build, warm, no change (`pkvm-harness build`)", measure.warm_build_no_change(n), "s")
        with tempfile.TemporaryDirectory(prefix="pkvm-bench-patch-") as scratch:
            f.add("build", "kernel build after touching nvhe/page_alloc.c",
                  measure.build_after_touching_page_alloc(n, Path(scratch)), "s", "<= 90")
    if "boot" in only:
        print("boot", flush=True)
        f.add("boot", "QEMU start to pKVM initialized", measure.pkvm_up_times(kernel, cache, n), "s")
        harness, bare = measure.harness_and_bare_boots(kernel, cache, n)
        f.add("boot", "to the ready marker: harness (QemuTarget)", harness, "s", "<= 1.5")
        f.add("boot", "to the ready marker: bare qemu-system-aarch64", bare, "s")
        f.ratio("boot", "harness / bare QEMU boot", harness, bare, "<= 1.1")
        whole, bare_paired = measure.warm_run_and_bare(max(n, 5))
        f.add("boot", "warm `pkvm-harness run -q`, start to exit", whole, "s")
        f.add("boot", "bare qemu-system-aarch64 to the ready marker (paired with the run)", bare_paired, "s")
        f.ratio("boot", "warm `pkvm-harness run -q` / bare QEMU boot", whole, bare_paired, "<= 1.2")
    if "suite" in only:
        print("suite", flush=True)
        f.add("suite", "default suites (pytest test_suites -m 'not slow')", measure.suite_wall(n), "s", "<= 600")
    if "kunit" in only:
        print("kunit (the first run builds KUnit's kernel)", flush=True)
        tree = build_request(KernelOptions(), cache, quiet=True).source.tree
        harness_first = measure.harness_first_verdict(n)
        first, warm = measure.kunit_first_result(tree, cache / "bench-kunit", n)
        f.extra["kunit_first_run"] = first
        f.add("kunit", "first test verdict: harness (pytest test_suites/boot)", harness_first, "s")
        f.add("kunit", "first test result: kunit.py run --arch arm64", warm, "s")
        f.ratio("kunit", "harness / KUnit, time to first verdict", harness_first, warm)
    if "el2" in only:
        print("el2", flush=True)
        first, cached = measure.dwarf_parse_ms(kernel, n)
        f.add("el2", "DWARF layouts, first parse of vmlinux", first, "ms", "<= 10000", digits=0)
        f.add("el2", "DWARF layouts, from the cache", cached, "ms", "<= 100", digits=1)
        f.add("el2", "EL2 snapshot (vCPUs paused), 1 GiB guest", measure.snapshot_pauses(kernel, cache, "1024", 2 * n),
              "ms", "<= 150", digits=1)
        runs = measure.traced_workload("1024", n)
        f.add("el2", "one traced allocator call",
              [(r["traced_s"] - r["untraced_s"]) * 1000 / max(1, r["ops"]) for r in runs], "ms", "<= 5", digits=2)
        f.add("el2", "traced / untraced workload", [r["traced_s"] / r["untraced_s"] for r in runs], "x", "<= 3",
              digits=2)
        f.add("el2", "buddy model, 1M random ops on a 1 GiB pool", measure.model_ops_per_s(1_000_000, n), "ops/s",
              ">= 200000", digits=0)
    if "el2trace" in only:
        print("el2trace (QEMU 10 TCG plugin)", flush=True)
        on, off, extra = measure.plugin_workload(n)
        f.extra["el2trace_workload"] = extra
        f.add("el2trace", "lifecycle workload, el2trace on", on, "s")
        f.add("el2trace", "lifecycle workload, el2trace off", off, "s")
        f.ratio("el2trace", "el2trace / untraced workload", on, off, target="<= 1.2")
        f.add("el2trace", "live replay of one workload's calls", [e["replay_s"] for e in extra], "s")
        suites_on = measure.suite_wall(max(1, n // 2), "--pkvm-el2-coverage")
        suites_off = measure.suite_wall(max(1, n // 2), "--pkvm-el2-plugin", "off")
        f.add("el2trace", "default suites, tracing + replay + coverage", suites_on, "s")
        f.add("el2trace", "default suites, el2trace off", suites_off, "s")
        f.ratio("el2trace", "suites with el2trace / without", suites_on, suites_off, target="<= 1.3")
        q72 = str(qemu_7_2(cache))
        f.add("el2trace", "QEMU 10.0 start to pKVM initialized", measure.pkvm_up_times(kernel, cache, n), "s")
        f.add("el2trace", "QEMU 10.0 + el2trace start to pKVM initialized",
              measure.pkvm_up_times(kernel, cache, n, el2_plugin="on"), "s")
        f.add("el2trace", "QEMU 7.2 start to pKVM initialized", measure.pkvm_up_times(kernel, cache, n, qemu=q72), "s")
    if "oracle" in only:
        print("oracle (the after-test checks: invariants and page-state transitions)", flush=True)
        walls, checks = measure.suite_checks(max(1, n // 2))
        f.add("oracle", "default suites", walls, "s")
        f.add("oracle", "of which after-test checks (every EL2 suite test)", checks, "s")
        f.ratio("oracle", "suites / suites without the after-test checks", walls,
                [w - c for w, c in zip(walls, checks)], target="<= 1.3")
        with_reads, without, free = measure.free_block_reads(kernel, cache, 2 * n)
        f.add("oracle", f"EL2 snapshot reading every free block ({free >> 20} MiB)", with_reads, "ms", digits=1)
        f.add("oracle", "EL2 snapshot without reading the free blocks", without, "ms", digits=1)
    if "errors" in only:
        print("errors (a full fault sweep; the hostile host's random mix)", flush=True)
        seconds, runs, findings = measure.fault_sweep(cache)
        f.add("errors", f"full fault sweep of a 1-vCPU lifecycle ({runs} runs, {findings} unexplained)",
              [seconds / 60], "min", "< 15", digits=1)
        on, off = measure.hostile_mix_rates(cache, n)
        f.add("errors", "hostile random mix, checked after every call", on, "calls/s", digits=1)
        f.add("errors", "hostile random mix, unchecked", off, "calls/s", digits=1)
    if "boards" in only:
        print("boards (EL2 through the dump kernel over SSH, as on a board)", flush=True)
        b = measure.board_snapshots(cache, max(1, n // 2))
        f.add("boards", "first snapshot through the dump (with its rounds)", b.first, "s", digits=2)
        f.add("boards", f"later snapshots through the dump ({b.kib:.0f} KiB a dump)", b.warm, "s", digits=2)
        f.add("boards", "the same machine's snapshot over QMP", b.qmp, "s", digits=2)
        f.add("boards", f"a VM lifecycle's {b.ring_calls} calls read from the 6.12 event ring", b.ring_read, "s",
              digits=2)
        f.add("boards", f"{b.transitions} transitions since power-on read from the ring and followed to a snapshot",
              b.judged, "s", digits=2)
    if "bisect" in only:
        print("bisect (the whole nine-commit bisect)", flush=True)
        steps = measure.bisect_steps(cache)
        if steps:
            f.add("bisect", "bisect step (build + boot + allocator suite)", steps, "s", "<= 90", digits=1)
    if "scaling" in only:
        print("scaling", flush=True)
        f.extra["scaling"] = scaling(kernel, cache, n)

    f.extra["total_s"] = round(time.monotonic() - started, 1)
    for row in f.rows:
        row["measured_at"] = f.extra["machine"]["date"]
    print_table(f.rows)
    # A partial run merges into the last whole one: this machine's, else the one the docs keep.
    base = a.json if a.json.is_file() else ROOT / "docs" / "benchmarks.json"
    result = merged(base, only, {**f.extra, "figures": f.rows})
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {a.json}")
    if a.docs:
        from docs_writer import write_docs

        for path in write_docs(result, ROOT / "docs"):
            print(f"written {path}")
    return 0


def merged(path: Path, only: list[str], new: dict) -> dict:
    """A partial run (--only) replaces its own sections in the last JSON and keeps the others,
    each row keeping the date it was measured."""
    if set(only) == set(SECTIONS) or not path.is_file():
        return new
    old = json.loads(path.read_text())
    for row in old.get("figures", []):
        row.setdefault("measured_at", old["machine"]["date"])
    rows = [r for r in old.get("figures", []) if r["section"] not in only] + new["figures"]
    rows.sort(key=lambda r: SECTIONS.index(r["section"]))
    # The header stays the full run's; the partial run is listed and its rows carry their date.
    keep = {k: v for k, v in old.items() if k != "figures" and not (k == "scaling" and "scaling" in only)}
    extras = {k: v for k, v in new.items() if k not in ("figures", "machine", "total_s", "kernel")}
    return {**keep, **extras, "figures": rows,
            "partial_runs": old.get("partial_runs", []) + [{"sections": only, "date": new["machine"]["date"],
                                                             "total_s": new["total_s"]}]}


def scaling(kernel, cache: Path, n: int) -> dict:
    out: dict = {"memory_mib": [], "snapshot_ms": [], "replay_ms_per_op": [], "replay_ops": [],
                 "model_ops": MODEL_OPS, "model_replay_s": []}
    for mem in MEMORY_MIB:
        pauses = measure.snapshot_pauses(kernel, cache, mem, 2 * n)
        runs = measure.traced_workload(mem, max(1, n // 2))
        out["memory_mib"].append(int(mem))
        out["snapshot_ms"].append(stats(pauses, 1))
        out["replay_ops"].append(statistics.median(r["ops"] for r in runs))
        out["replay_ms_per_op"].append(stats([r["replay_s"] * 1000 / max(1, r["ops"]) for r in runs], 4))
        print(f"  {mem} MiB: snapshot {out['snapshot_ms'][-1]['median']} ms, replay "
              f"{out['replay_ms_per_op'][-1]['median']} ms/op", flush=True)
    for ops in MODEL_OPS:
        out["model_replay_s"].append(stats(measure.model_replay_seconds(ops, n), 4))
        print(f"  {ops} ops: model replay {out['model_replay_s'][-1]['median']} s", flush=True)
    return out


def print_table(rows: list[dict]) -> None:
    width = max(len(r["name"]) for r in rows) + 2 if rows else 10
    print(f"\n{'figure':{width}} {'median':>11} {'min':>11} {'max':>11} {'n':>3}  unit   target")
    for r in rows:
        print(f"{r['name']:{width}} {r['median']:>11} {r['min']:>11} {r['max']:>11} {r['n']:>3}  "
              f"{r['unit']:<6} {r['target']}")


if __name__ == "__main__":
    sys.exit(main())
