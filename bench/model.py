#!/usr/bin/env python3
"""Buddy-model benchmark: prints figures, asserts nothing (target printed beside them).

Replays a seeded trace of random hyp_pool operations (alloc / put / get / split)
through harness.model.buddy.HypPool and reports ops/s (median/min/max over runs)
per kernel rule set, for a 1-GiB pool (262144 pages) and a small one.

  target: >= 200,000 ops/s median for 1,000,000 operations

The trace is recorded once per (version, pool) by driving a fresh pool with a
seeded RNG; each timed run replays the recorded calls on another fresh pool
(construction is not timed). Replays are deterministic, so every run returns
the same values: a checksum of the results is printed to show that.

Usage: python bench/model.py [--ops 1000000] [--runs 5] [--versions 6.12,5.15] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.model.buddy import HypPool, version_rules  # noqa: E402

TARGET_OPS_S = 200_000
VERSIONS = ["5.13", "5.14", "5.15", "6.1", "6.2", "6.12", "6.14"]   # one per rule set
POOLS = {"1GiB": (0x4000_0000, 262_144, 0), "small": (0x8765_3000, 97, 3)}
ALLOC, PUT, GET, SPLIT = 0, 1, 2, 3
ORDERS = [0] * 70 + [1] * 12 + [2] * 8 + [3] * 4 + [4] * 2 + list(range(5, 12))


def record(version: str, pool_args: tuple[int, int, int], n_ops: int, seed: int) -> tuple[list, list]:
    """Drive a fresh pool with random legal operations; return (kinds, args)."""
    rng = random.Random(seed)
    start, nr, reserved = pool_args
    pool = HypPool(start, nr, reserved, version=version)
    can_split = version_rules(version).has_split
    cap = max(8, nr // 4)          # live references kept around: keeps the pool partly full
    live: list[int] = []           # one entry per reference we hold (random choice in O(1))
    refs: dict[int, int] = {}      # page -> references we hold
    blocks: dict[int, int] = {}    # unsplit allocated block head -> order
    kinds: list[int] = []
    args: list[int] = []

    def hold(pa: int) -> None:
        live.append(pa)
        refs[pa] = refs.get(pa, 0) + 1

    while len(kinds) < n_ops:
        r = rng.random()
        p_alloc = 0.5 if len(live) < cap else 0.25
        if not live or r < p_alloc:
            order = rng.choice(ORDERS)
            pa = pool.alloc(order)
            kinds.append(ALLOC)
            args.append(order)
            if pa is not None:
                hold(pa)
                if order:
                    blocks[pa] = order
        elif r < p_alloc + 0.1:
            pa = live[rng.randrange(len(live))]
            pool.get(pa)
            kinds.append(GET)
            args.append(pa)
            hold(pa)
        elif r < p_alloc + 0.15 and can_split and blocks:
            pa, order = blocks.popitem()
            pool.split(pa)
            kinds.append(SPLIT)
            args.append(pa)
            for i in range(1, 1 << order):
                hold(pa + (i << 12))
        else:
            j = rng.randrange(len(live))
            live[j], live[-1] = live[-1], live[j]
            pa = live.pop()
            pool.put(pa)
            kinds.append(PUT)
            args.append(pa)
            refs[pa] -= 1
            if not refs[pa]:
                del refs[pa]
                blocks.pop(pa, None)
    return kinds, args


def replay(version: str, pool_args: tuple[int, int, int], kinds: list, args: list) -> tuple[float, int]:
    """Time one replay on a fresh pool; return (seconds, checksum of the results)."""
    pool = HypPool(pool_args[0], pool_args[1], pool_args[2], version=version)
    fns = (pool.alloc, pool.put, pool.get, pool.split)
    calls = [fns[k] for k in kinds]
    t0 = time.perf_counter()
    for f, a in zip(calls, args):
        f(a)
    dt = time.perf_counter() - t0
    return dt, hash(tuple(tuple(v) for v in pool.free_lists().values())) & 0xFFFF_FFFF


def stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values)), "min": round(min(values)),
            "max": round(max(values)), "n": len(values)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--versions", default=",".join(VERSIONS))
    ap.add_argument("--json", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "model.json")
    opts = ap.parse_args()

    results: dict = {"ops": opts.ops, "runs": opts.runs, "seed": opts.seed,
                     "target_ops_per_s": TARGET_OPS_S, "python": sys.version.split()[0],
                     "pools": {k: {"range_start": hex(v[0]), "nr_pages": v[1], "reserved": v[2]}
                               for k, v in POOLS.items()},
                     "results": {}}
    print(f"buddy model: {opts.ops:,} ops x {opts.runs} runs  (target: median >= {TARGET_OPS_S:,} ops/s)")
    for version in opts.versions.split(","):
        rules = version_rules(version)
        per_pool = {}
        for name, pool_args in POOLS.items():
            kinds, args = record(version, pool_args, opts.ops, opts.seed)
            mix = {k: kinds.count(i) for i, k in enumerate(("alloc", "put", "get", "split"))}
            times, sums = [], set()
            for _ in range(opts.runs):
                dt, checksum = replay(version, pool_args, kinds, args)
                times.append(opts.ops / dt)
                sums.add(checksum)
            s = stats(times)
            per_pool[name] = {"ops_per_s": s, "mix": mix, "deterministic": len(sums) == 1}
            verdict = "ok" if s["median"] >= TARGET_OPS_S else "BELOW TARGET"
            print(f"  {version:5} ({rules.name:5}) {name:5}: median {s['median']:>9,} ops/s  "
                  f"min {s['min']:>9,}  max {s['max']:>9,}  [{verdict}]  mix {mix}")
        results["results"][version] = {"rules": rules.name, **per_pool}
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    opts.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
