"""EL2 coverage (harness.report.coverage) from executed-block counts, through the DWARF lines of
harness.el2.lines: first on a tiny made-up line table, then on the default kernel's vmlinux (found
as the integration tests find it; skipped, never built, when the cache does not have it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from harness.el2 import lines as el2lines
from harness.el2.lines import Function, Lines, Row
from harness.errors import HarnessError
from harness.kernel.build import KernelArtifacts, lookup
from harness.machine import build_request
from harness.options import KernelOptions
from harness.paths import default_cache_dir
from harness.report import coverage as cov

PAGE_ALLOC = "arch/arm64/kvm/hyp/nvhe/page_alloc.c"
OBJDUMP = "aarch64-linux-gnu-objdump"


def parse_lcov(path: Path) -> dict[str, dict]:
    """SF -> its record: the LF/LH/FNF/FNH values, DA and FNDA as dicts, and FN lines."""
    records: dict[str, dict] = {}
    current: dict = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "SF":
            current = records.setdefault(value, {"DA": {}, "FN": {}, "FNDA": {}})
        elif key == "DA":
            n, count = value.split(",")
            current["DA"][int(n)] = int(count)
        elif key == "FN":
            n, name = value.split(",")
            current["FN"][name] = int(n)
        elif key == "FNDA":
            count, name = value.split(",")
            current["FNDA"][name] = int(count)
        elif key in ("LF", "LH", "FNF", "FNH"):
            current[key] = int(value)
        elif key == "end_of_record":
            current["ended"] = True
        else:
            assert key == "TN", line
    return records


# --- a made-up line table: the arithmetic -----------------------------------------------------

TINY = Lines(
    rows=[Row(0x1000, 0x1008, "hyp/a.c", 10),
          Row(0x1008, 0x1008, "hyp/a.c", 11),         # no bytes: stands for the instruction at 0x1008
          Row(0x1008, 0x1010, "hyp/a.c", 12),
          Row(0x1010, 0x1014, "hyp/h.h", 3),          # inlined: its own file
          Row(0x2000, 0x2008, "hyp/a.c", 20),
          Row(0x3000, 0x3004, "hyp/h.h", 7),
          Row(0x3100, 0x3104, "hyp/h.h", 7)],
    functions=[Function("f", "hyp/a.c", 9, 0x1000, 0x1014),
               Function("g", "hyp/a.c", 19, 0x2000, 0x2008),
               Function("inl", "hyp/h.h", 6, 0x3000, 0x3004),     # one static inline, two out-of-line copies
               Function("inl", "hyp/h.h", 6, 0x3100, 0x3104)],
    source_root=None)


def test_overlapping_blocks_sum_per_instruction():
    counts = cov.instruction_counts([(0x1000, 8, 3), (0x1004, 12, 2), (0x1004, 4, 1)])
    assert counts == {0x1000: 3, 0x1004: 6, 0x1008: 2, 0x100C: 2}


def test_lines_and_functions_of_a_tiny_table():
    c = cov.compute([(0x1000, 8, 3), (0x1004, 16, 2), (0x3100, 4, 5)], TINY)
    # 10: max(3, 5); 11: the instruction at 0x1008; 12: max(2, 2); 20: never ran
    assert c.lines == {"hyp/a.c": {10: 5, 11: 2, 12: 2, 20: 0}, "hyp/h.h": {3: 2, 7: 5}}
    assert [(f.name, f.line, f.count) for f in c.functions["hyp/a.c"]] == [("f", 9, 3), ("g", 19, 0)]
    assert [(f.name, f.count) for f in c.functions["hyp/h.h"]] == [("inl", 5)]     # the copies merged
    assert cov.summarize(c, under="hyp/") == [cov.FileSummary("hyp/a.c", 4, 3, 2, 1),
                                              cov.FileSummary("hyp/h.h", 2, 2, 1, 1)]
    assert cov.summarize(c) == []           # nothing of the made-up table is under arch/arm64/kvm/hyp/
    assert [f.name for f in cov.never_run(c, files=("a.c",))] == ["g"]
    assert TINY.instrumentable() == {"hyp/a.c": {10, 11, 12, 20}, "hyp/h.h": {3, 7}}


def test_nothing_ran_and_blocks_outside_the_table_count_for_nothing():
    c = cov.compute([(0x9000, 64, 100)], TINY)
    assert all(n == 0 for per_file in c.lines.values() for n in per_file.values())
    assert [f.name for f in cov.never_run(c, files=("a.c", "h.h"))] == ["f", "g", "inl"]


def test_lcov_of_a_tiny_table(tmp_path):
    c = cov.compute([(0x1000, 8, 3)], TINY)
    cov.write_lcov(tmp_path / "t.info", c)
    records = parse_lcov(tmp_path / "t.info")
    assert records["hyp/a.c"] == {"DA": {10: 3, 11: 0, 12: 0, 20: 0}, "FN": {"f": 9, "g": 19},
                                  "FNDA": {"f": 3, "g": 0}, "FNF": 2, "FNH": 1, "LF": 4, "LH": 1,
                                  "ended": True}
    cov.write_lcov(tmp_path / "rooted.info", c, source_root=Path("/src/linux"))
    assert set(parse_lcov(tmp_path / "rooted.info")) == {"/src/linux/hyp/a.c", "/src/linux/hyp/h.h"}


def test_html_without_genhtml_lists_never_run_functions(tmp_path, monkeypatch):
    lines = Lines([Row(0x1000, 0x1004, "arch/arm64/kvm/hyp/nvhe/page_alloc.c", 5)],
                  [Function("hyp_alloc_pages", "arch/arm64/kvm/hyp/nvhe/page_alloc.c", 4, 0x1000, 0x1004),
                   Function("hyp_<odd>", "arch/arm64/kvm/hyp/pgtable.c", 4, 0x2000, 0x2004)], None)
    monkeypatch.setattr(cov.shutil, "which", lambda name: None)
    index = cov.write_html(tmp_path / "html", cov.compute([(0x1000, 4, 1)], lines))
    page = index.read_text()
    assert "hyp_&lt;odd&gt;" in page and "<odd>" not in page             # escaped
    assert "1/1" in page and "0/1" in page and "hyp_alloc_pages" not in page.split("never ran")[1].split("<h2>")[0]


@pytest.mark.skipif(shutil.which("genhtml") is None, reason="genhtml is not installed (`make setup` installs lcov)")
def test_genhtml_renders_without_the_source_tree(tmp_path):
    c = cov.compute([(0x1000, 8, 3)], TINY)
    index = cov.write_html(tmp_path / "html", c, source_root=tmp_path / "no-such-tree")
    assert index == tmp_path / "html" / "index.html" and not (tmp_path / "html" / "genhtml.log").exists()
    assert (tmp_path / "html" / "hyp" / "a.c.gcov.html").is_file()       # directories as in the tree


# --- the default kernel's vmlinux -------------------------------------------------------------

@pytest.fixture(scope="module")
def kernel() -> KernelArtifacts:
    """The default kernel from the cache, as tests/integration/conftest.py's `kernel` fixture asks
    for it (build_request), but looked up, not built: `pkvm-harness build` (first in `make test`)
    builds it."""
    try:
        key, entry, _ = lookup(build_request(KernelOptions(), default_cache_dir(), quiet=True))
    except HarnessError as e:
        pytest.skip(f"no default kernel: {e}")
    if not (entry / "meta.json").is_file():
        pytest.skip("the default kernel is not built (`pkvm-harness build` builds it)")
    return KernelArtifacts(key, entry, {}, reused=True)


@pytest.fixture(scope="module")
def lines(kernel) -> Lines:
    return el2lines.load(kernel.vmlinux)


@pytest.fixture(scope="module")
def system_map(kernel) -> dict[str, int]:
    return {name: int(addr, 16) for addr, _, name in
            (line.split()[:3] for line in kernel.system_map.read_text().splitlines())}


def function(lines: Lines, name: str) -> Function:
    (fn,) = [f for f in lines.functions if f.name == name and f.file == PAGE_ALLOC]
    return fn


def test_a_block_at_hyp_alloc_pages_runs_it_and_its_first_lines_only(lines, system_map):
    alloc, attach = function(lines, "hyp_alloc_pages"), function(lines, "__hyp_attach_page")
    assert alloc.low == system_map["__kvm_nvhe_hyp_alloc_pages"]        # DWARF and symbols agree
    assert attach.low == system_map["__kvm_nvhe___hyp_attach_page"]     # out of line: its own entry
    c = cov.compute([(system_map["__kvm_nvhe_hyp_alloc_pages"], 8, 1)], lines)
    counts = {f.name: f.count for f in c.functions[PAGE_ALLOC]}
    assert counts["hyp_alloc_pages"] == 1
    assert counts["__hyp_attach_page"] == 0 and counts["hyp_pool_init"] == 0
    hit = {n for n, count in c.lines[PAGE_ALLOC].items() if count}
    body_end = min(f.line for f in lines.functions if f.file == PAGE_ALLOC and f.line > alloc.line)
    assert alloc.line + 1 in hit                     # `unsigned short i = order;`, its first statement
    assert hit and all(alloc.line <= n < body_end for n in hit)
    last = max((r for r in lines.rows if r.file == PAGE_ALLOC and alloc.low <= r.start < alloc.high),
               key=lambda r: r.start)
    assert last.line not in hit                       # the end of the function did not run
    assert "hyp_alloc_pages" not in {f.name for f in cov.never_run(c)}
    assert {"__hyp_attach_page", "hyp_pool_init"} <= {f.name for f in cov.never_run(c)}


def test_overlapping_blocks_sum_on_the_real_table(lines, system_map):
    start = system_map["__kvm_nvhe_hyp_alloc_pages"]
    c = cov.compute([(start, 8, 3), (start, 16, 4)], lines)    # one entry translated into two blocks
    assert {f.name: f.count for f in c.functions[PAGE_ALLOC]}["hyp_alloc_pages"] == 7
    entry_line = next(r.line for r in lines.rows if r.start == start and r.file == PAGE_ALLOC)
    assert c.lines[PAGE_ALLOC][entry_line] == 7


@pytest.mark.skipif(shutil.which(OBJDUMP) is None, reason=f"{OBJDUMP} is not installed (`make setup`)")
def test_page_alloc_instrumentable_lines_are_objdumps_is_stmt_lines(lines, kernel):
    """objdump's own decoding of the line table: the distinct lines of page_alloc.c with an is_stmt
    row (Stmt column "x"), line 0 (no source line) aside."""
    proc = subprocess.Popen([OBJDUMP, "--wide", "--dwarf=decodedline", str(kernel.vmlinux)],
                            stdout=subprocess.PIPE, text=True, errors="replace")
    assert proc.stdout is not None
    theirs: set[int] = set()
    current = ""
    for text in proc.stdout:
        if text.endswith(":\n"):                     # "CU: /path/file.c:" or "/path/file.h:" heads its rows
            current = text.removeprefix("CU: ").rstrip(":\n")
        elif current.endswith("/" + PAGE_ALLOC):
            cols = text.split()
            if len(cols) >= 4 and cols[-1] == "x" and cols[1].isdigit() and cols[1] != "0":
                theirs.add(int(cols[1]))
    assert proc.wait(timeout=120) == 0
    assert len(lines.instrumentable()[PAGE_ALLOC]) == len(theirs) > 50
    assert lines.instrumentable()[PAGE_ALLOC] == theirs


def test_rows_stop_at_function_entries_and_stay_in_the_nvhe_text(lines, system_map):
    text = (system_map["__kvm_nvhe___hyp_idmap_text_start"], system_map["__kvm_nvhe___hyp_text_end"])
    assert all(text[0] <= r.start < r.end <= text[1] or r.start == r.end for r in lines.rows)
    entries = sorted({f.low for f in lines.functions})
    for row in lines.rows:
        inside = [e for e in entries if row.start < e < row.end]
        assert not inside, f"{row} runs over the entry {inside[0]:#x}"
    files = {r.file for r in lines.rows}
    assert {PAGE_ALLOC, "arch/arm64/kvm/hyp/nvhe/mem_protect.c", "arch/arm64/kvm/hyp/pgtable.c",
            "arch/arm64/kvm/hyp/include/nvhe/memory.h"} <= files
    assert not any(f.startswith(("arch/arm64/kvm/hyp/vhe/", "/")) for f in files)   # VHE and unknown roots


def test_lcov_round_trips_the_summary(lines, system_map, kernel, tmp_path):
    start = system_map["__kvm_nvhe_hyp_alloc_pages"]
    c = cov.compute([(start, 64, 2), (system_map["__kvm_nvhe___pkvm_host_share_hyp"], 32, 1)], lines)
    info = tmp_path / "el2.info"
    cov.write_lcov(info, c)
    records = parse_lcov(info)
    summary = cov.summarize(c)
    assert {s.file for s in summary} <= set(records)
    assert any(s.lines_hit for s in summary if s.file.endswith("mem_protect.c"))
    for s in summary:
        r = records[s.file]
        assert (r["LF"], r["LH"], r["FNF"], r["FNH"]) == (s.lines_found, s.lines_hit,
                                                          s.functions_found, s.functions_hit), s.file
        assert r["LF"] == len(r["DA"]) and r["LH"] == sum(1 for n in r["DA"].values() if n)
        assert set(r["FN"]) == set(r["FNDA"]) and r["ended"]
    page_alloc = records[PAGE_ALLOC]
    assert page_alloc["FN"]["hyp_alloc_pages"] == function(lines, "hyp_alloc_pages").line
    assert page_alloc["FNDA"]["hyp_alloc_pages"] == 2 and page_alloc["FNDA"]["__hyp_attach_page"] == 0
