"""EL2 code coverage: executed-block counts of the nVHE text, mapped to source lines and functions.

The blocks come from a TCG plugin: (start, size, count) with start a vmlinux link-time address and
every instruction of the block run `count` times. Blocks may overlap (the same code translated
twice from different starts); an instruction's count is the sum over the blocks that cover it.
Lines and functions come from harness.el2.lines. Nothing here reads files; write_lcov and
write_html write their output, and write_html may run genhtml.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import jinja2

from harness.el2.lines import HYP_DIR, INSN, Lines

Block = tuple[int, int, int]          # (start, size in bytes, count)
NEVER_RUN_FILES = ("page_alloc.c", "mem_protect.c", "pgtable.c")   # the allocator and stage 2
GENHTML_TIMEOUT = 300.0


@dataclass(frozen=True)
class FunctionCoverage:
    """A function and how often its entry instruction ran. Copies of one function (a static inline
    emitted out of line in several units) are one entry whose count is their sum, as lcov merges."""

    name: str
    file: str
    line: int
    count: int


@dataclass
class Coverage:
    """Per file: every instrumentable line with its count (0: never ran) and every function."""

    lines: dict[str, dict[int, int]]
    functions: dict[str, list[FunctionCoverage]]

    def files(self) -> list[str]:
        return sorted(set(self.lines) | set(self.functions))


@dataclass(frozen=True)
class FileSummary:
    """lcov's LF/LH/FNF/FNH of one file."""

    file: str
    lines_found: int
    lines_hit: int
    functions_found: int
    functions_hit: int


def instruction_counts(blocks: Iterable[Block]) -> dict[int, int]:
    """address -> times that instruction ran, summed over the (possibly overlapping) blocks."""
    counts: dict[int, int] = defaultdict(int)
    for start, size, count in blocks:
        for addr in range(start, start + size, INSN):
            counts[addr] += count
    return dict(counts)


def compute(blocks: Iterable[Block], lines: Lines) -> Coverage:
    """Coverage of `lines` by `blocks`. A line's count is the most any one of its instructions ran
    (so it is hit when any of them ran); a function's is its entry (low_pc) instruction's."""
    ran = instruction_counts(blocks)
    per_line: dict[str, dict[int, int]] = defaultdict(dict)
    for row in lines.rows:
        count = max(ran.get(a, 0) for a in row.addresses)
        known = per_line[row.file]
        known[row.line] = max(known.get(row.line, 0), count)
    merged: dict[tuple[str, str], tuple[int, int]] = {}       # (file, name) -> (line, count)
    for fn in lines.functions:
        line, count = merged.get((fn.file, fn.name), (fn.line, 0))
        merged[fn.file, fn.name] = (min(line, fn.line), count + ran.get(fn.low, 0))
    per_function: dict[str, list[FunctionCoverage]] = defaultdict(list)
    for (file, name), (line, count) in merged.items():
        per_function[file].append(FunctionCoverage(name, file, line, count))
    for fns in per_function.values():
        fns.sort(key=lambda f: (f.line, f.name))
    return Coverage(dict(per_line), dict(per_function))


def summarize(coverage: Coverage, under: str = HYP_DIR) -> list[FileSummary]:
    """Found/hit counts of each file under `under` (the hypervisor's own sources and headers)."""
    out = []
    for file in coverage.files():
        if not file.startswith(under):
            continue
        lines = coverage.lines.get(file, {})
        fns = coverage.functions.get(file, [])
        out.append(FileSummary(file, len(lines), sum(1 for c in lines.values() if c),
                               len(fns), sum(1 for f in fns if f.count)))
    return out


def never_run(coverage: Coverage, files: Iterable[str] = NEVER_RUN_FILES) -> list[FunctionCoverage]:
    """Functions of the files with these base names whose entry never ran, by file and line."""
    names = set(files)
    return [fn for file in coverage.files() if os.path.basename(file) in names
            for fn in coverage.functions.get(file, []) if not fn.count]


def _lcov_text(coverage: Coverage, source_root: Path | None = None, test_name: str = "pkvm_el2") -> str:
    out = []
    for file in coverage.files():
        lines = coverage.lines.get(file, {})
        fns = coverage.functions.get(file, [])
        path = str(source_root / file) if source_root and not os.path.isabs(file) else file
        out += [f"TN:{test_name}", f"SF:{path}"]
        out += [f"FN:{f.line},{f.name}" for f in fns]
        out += [f"FNDA:{f.count},{f.name}" for f in fns]
        out += [f"FNF:{len(fns)}", f"FNH:{sum(1 for f in fns if f.count)}"]
        out += [f"DA:{line},{count}" for line, count in sorted(lines.items())]
        out += [f"LF:{len(lines)}", f"LH:{sum(1 for c in lines.values() if c)}", "end_of_record"]
    return "\n".join(out) + "\n"


def write_lcov(path: Path, coverage: Coverage, source_root: Path | None = None) -> None:
    """Write an lcov tracefile (TN, SF, FN, FNDA, FNF, FNH, DA, LF, LH per file); paths stay relative
    to the kernel source tree unless source_root is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_lcov_text(coverage, source_root))


def write_html(out_dir: Path, coverage: Coverage, source_root: Path | None = None,
               timeout: float = GENHTML_TIMEOUT) -> Path:
    """An HTML report in out_dir; returns its index.html. With genhtml (Debian's lcov) on PATH, its
    annotated-source pages from out_dir/coverage.info; otherwise (or if genhtml fails, its output
    left in out_dir/genhtml.log) one summary page with each file's never-run functions."""
    out_dir.mkdir(parents=True, exist_ok=True)
    genhtml = shutil.which("genhtml")
    if genhtml is not None:
        have_sources = source_root is not None and source_root.is_dir()
        info = out_dir / "coverage.info"
        write_lcov(info, coverage, source_root if have_sources else None)
        # --prefix: directories named as in the kernel tree (genhtml makes relative paths absolute
        # from its cwd). --ignore-errors source: without the tree (or a generated header missing from
        # it), genhtml would stop at the first file it cannot read.
        prefix = source_root if have_sources else out_dir.resolve()
        argv = [genhtml, "--quiet", "--function-coverage", "--ignore-errors", "source", "--prefix", str(prefix),
                "--output-directory", str(out_dir), str(info)]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=out_dir.resolve())
            log = r.stdout + r.stderr
            if r.returncode == 0 and (out_dir / "index.html").is_file():
                return out_dir / "index.html"
        except subprocess.TimeoutExpired:
            log = f"genhtml passed its {timeout:.0f}s deadline\n"
        (out_dir / "genhtml.log").write_text(log)
    index = out_dir / "index.html"
    index.write_text(_summary_html(coverage))
    return index


def _summary_html(coverage: Coverage) -> str:
    env = jinja2.Environment(loader=jinja2.PackageLoader("harness.report", "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    files = summarize(coverage)
    total = FileSummary("total", *(sum(getattr(s, k) for s in files) for k in
                                   ("lines_found", "lines_hit", "functions_found", "functions_hit")))
    never = {s.file: [f for f in coverage.functions.get(s.file, []) if not f.count] for s in files}
    return env.get_template("coverage.html.j2").render(files=files, total=total, never=never,
                                                       focus=never_run(coverage), focus_files=NEVER_RUN_FILES)
