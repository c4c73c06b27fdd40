"""docs/benchmarks.md, docs/benchmarks.json and docs/benchmarks-scaling.png from bench/run.py's figures."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")                      # files only
import matplotlib.pyplot as plt  # noqa: E402

BEGIN, END = "<!-- figures: begin (bench/run.py --docs) -->", "<!-- figures: end -->"


def _table(figures: dict) -> str:
    m = figures["machine"]
    lines = [f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}, "
             f"{m['qemu']}, Python {m['python']}; kernel {figures['kernel']} (`-cpu max`, `-smp 2`, 1 GiB). "
             f"Whole run: {figures.get('total_s', '?')} s."
             + "".join(f" Then `--only {','.join(p['sections'])}` on {p['date']} ({p['total_s']} s)."
                       for p in figures.get("partial_runs", [])), "",
             "| section | figure | median | min | max | n | unit | target |", "|---|---|---|---|---|---|---|---|"]
    for r in figures["figures"]:
        extra = f" (ratio of medians {r['ratio_of_medians']})" if "ratio_of_medians" in r else ""
        notes = [r["note"]] if r.get("note") else []
        if r.get("measured_at") and r["measured_at"] != m["date"]:
            notes.append(f"measured {r['measured_at']}")
        note = f" ({'; '.join(notes)})" if notes else ""
        lines.append(f"| {r['section']} | {r['name']}{note} | {r['median']}{extra} | {r['min']} | {r['max']} | "
                     f"{r['n']} | {r['unit']} | {r['target']} |")
    first = figures.get("kunit_first_run")
    if first:
        how = "a cold build of KUnit's kernel" if first["cold"] else "its build directory was left by an earlier run"
        lines += ["", f"KUnit's first run in this bench (not among the samples; {how}): "
                      f"{first['seconds']} s to its first result."]
    return "\n".join(lines)


def plot(scaling: dict, path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    mem = scaling["memory_mib"]
    snap = [s["median"] for s in scaling["snapshot_ms"]]
    replay = [s["median"] * 1000 for s in scaling["replay_ms_per_op"]]
    left.plot(mem, snap, "o-", label="EL2 snapshot pause (ms)")
    left.set_xscale("log", base=2)
    left.set_xticks(mem, [f"{m} MiB" for m in mem])
    left.set_xlabel("guest memory")
    left.set_ylabel("snapshot pause (ms)")
    twin = left.twinx()
    twin.plot(mem, replay, "s--", color="tab:orange", label="model replay (µs per traced call)")
    twin.set_ylabel("model replay (µs per traced call)")
    left.set_ylim(bottom=0)
    twin.set_ylim(bottom=0)
    left.legend(handles=left.get_lines() + twin.get_lines(), loc="upper left", fontsize=8)
    left.set_title("against guest memory (median)")
    ops = scaling["model_ops"]
    seconds = [s["median"] for s in scaling["model_replay_s"]]
    right.loglog(ops, seconds, "o-", label="buddy model replay")
    right.loglog(ops, [seconds[0] * o / ops[0] for o in ops], ":", color="grey", label="linear from the first point")
    right.set_xlabel("operations replayed")
    right.set_ylabel("seconds")
    right.legend(fontsize=8)
    right.set_title("model replay against operations (1 GiB pool, 6.12 rules)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_docs(figures: dict, docs: Path) -> list[Path]:
    path = docs / "benchmarks.md"
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} lacks the {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + BEGIN + "\n" + _table(figures) + "\n" + END + tail)
    data = docs / "benchmarks.json"            # bench/results/ is local; the docs keep their own copy
    data.write_text(json.dumps(figures, indent=2) + "\n")
    written = [path, data]
    if "scaling" in figures:
        written.append(plot(figures["scaling"], docs / "benchmarks-scaling.png"))
    return written
