"""The EL2 coverage of a run directory (`pkvm-harness coverage RUN_DIR`, `--pkvm-el2-coverage`):
which of the hypervisor's lines and functions ran, from the block counts el2trace wrote when the
run's QEMU exited; lcov .info, HTML, and a summary."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.el2 import lines as dwarf_lines
from harness.el2.tcg.probes import Layout
from harness.el2.tcg.stream import Calls, StreamError, read_records, stream_bytes
from harness.errors import UsageError
from harness.fsutil import atomic_write_text
from harness.report import coverage as cov

# The files whose figures the summary always shows (the allocator, stage 2 and the host's entry).
KEY_FILES = ("page_alloc.c", "mem_protect.c", "pgtable.c", "pkvm.c", "mm.c", "hyp-main.c")


@dataclass
class CoverageOutcome:
    out_dir: Path
    index: Path
    files: list[cov.FileSummary]
    never_run: list[cov.FunctionCoverage]
    blocks: int

    def key_files(self) -> list[cov.FileSummary]:
        return [s for s in self.files if Path(s.file).name in KEY_FILES and "/nvhe/" in s.file + "/nvhe/"]

    def to_dict(self) -> dict:
        return {"blocks": self.blocks, "files": [asdict(s) for s in self.files],
                "never_run": [{"function": f.name, "file": f.file, "line": f.line} for f in self.never_run],
                "html": str(self.index)}


def blocks_of(run_dir: Path) -> tuple[list[cov.Block], Layout]:
    """The block counts of a run directory's el2trace stream. UsageError when it has none."""
    stream, layout_file = run_dir / "el2trace.bin", run_dir / "el2trace-layout.json"
    if not (stream.is_file() or stream.with_suffix(".bin.gz").is_file()) or not layout_file.is_file():
        raise UsageError(f"{run_dir} has no el2trace.bin and el2trace-layout.json",
                         hint="pass the run directory of a run on QEMU 9.1+ with --el2-plugin on or auto")
    layout = Layout.from_json(layout_file.read_text())
    try:
        records, _ = read_records(stream_bytes(run_dir))
    except (StreamError, OSError, EOFError) as e:
        raise UsageError(f"{stream} is not an el2trace stream: {e}", hint="pass a run directory the harness wrote") \
            from None
    calls = Calls(layout)
    calls.feed(records)
    if not calls.coverage.blocks:
        raise UsageError(f"{stream} holds no block counts: its QEMU did not exit cleanly (they are written at exit)",
                         hint="coverage needs a run whose target was stopped by the harness")
    return calls.coverage.blocks, layout


def el2_coverage(run_dir: Path, out_dir: Path | None = None,
                 blocks: list[cov.Block] | None = None) -> CoverageOutcome:
    """`blocks`: the counts already decoded (a live session has them); else read from the run's stream."""
    if blocks is None:
        blocks, layout = blocks_of(run_dir)
    elif not blocks:
        raise UsageError("the session's QEMU wrote no block counts: it did not exit cleanly (they are "
                         "written at exit)", hint="coverage needs a run whose target was stopped by the harness")
    else:
        layout = Layout.from_json((run_dir / "el2trace-layout.json").read_text())
    vmlinux = Path(layout.vmlinux)
    if not layout.vmlinux or not vmlinux.is_file():
        raise UsageError(f"the run's vmlinux {layout.vmlinux or '(not recorded)'} is gone",
                         hint="rebuild that kernel (pkvm-harness build), or run again")
    found = dwarf_lines.load(vmlinux)
    coverage = cov.compute(blocks, found)
    out_dir = out_dir or run_dir / "el2-coverage"
    cov.write_lcov(out_dir / "coverage.info", coverage)
    index = cov.write_html(out_dir, coverage, found.source_root)
    outcome = CoverageOutcome(out_dir, index, cov.summarize(coverage), cov.never_run(coverage), len(blocks))
    atomic_write_text(out_dir / "summary.json", json.dumps(outcome.to_dict(), indent=1) + "\n")
    return outcome


def render(outcome: CoverageOutcome) -> str:
    """Per-file figures of the key files, and the allocator and stage-2 functions never run."""
    lines = [f"{'file':<44} {'lines':>13} {'functions':>13}"]
    for s in outcome.key_files():
        lines.append(f"{s.file:<44} {s.lines_hit:>5}/{s.lines_found:<4} {_pct(s.lines_hit, s.lines_found):>3} "
                     f"{s.functions_hit:>4}/{s.functions_found:<4} {_pct(s.functions_hit, s.functions_found):>3}")
    lines.append(f"never run ({', '.join(cov.NEVER_RUN_FILES)}): "
                 + (", ".join(f.name for f in outcome.never_run) or "none"))
    lines.append(f"html: {outcome.index}")
    return "\n".join(lines)


def _pct(hit: int, found: int) -> str:
    return f"{100 * hit // found}%" if found else "-"
