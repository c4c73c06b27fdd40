"""`pkvm-harness inject` on the default kernel, as a user runs it: the lifecycle's EL2 allocation
calls counted from a gdbstub, and one of them failed on purpose, judged (handled, leaked or
panicked), with the kernel's explanation where its code gives one."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.conftest import qemu_pids_mentioning, run_cli

FAST = ["--el2-plugin", "off", "-q"]


def _run_dir(out: str) -> Path:
    line = next(ln for ln in out.splitlines() if ln.startswith("run dir: "))
    return Path(line.split()[2])


def test_counting_names_every_allocation_call_of_a_lifecycle_with_its_callers(kernel, tmp_path):
    r = run_cli("inject", *FAST, "--runs-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((_run_dir(r.stdout) / "inject.json").read_text())
    counts = data["counts"]
    assert counts.get("hyp_alloc_pages(vm)", 0) >= 2 and counts.get("hyp_alloc_pages(hpool)", 0) >= 1, counts
    assert data["fired"] is None and all(not c["failed"] for c in data["calls"])
    # a VM's pool is drained at its teardown: those calls run under the teardown hypercall's handler
    drains = [c for c in data["calls"] if c["caller"].startswith("reclaim_guest_pages")]
    assert drains and all("handle___pkvm_teardown_vm" in c["chain"] for c in drains), drains[:2]
    assert qemu_pids_mentioning(str(tmp_path)) == []


def test_a_failed_drain_of_a_vms_pool_leaks_what_is_left_and_is_explained(kernel, tmp_path):
    r = run_cli("inject", *FAST, "--site", "hyp_alloc_pages", "--pool", "vm", "--nth", "2",
                "--runs-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr           # explained: not a finding
    assert "from reclaim_guest_pages" in r.stdout and "verdict: leaked" in r.stdout, r.stdout
    assert "host OWNED / hyp NOPAGE -> host NOPAGE / hyp OWNED" in r.stdout, r.stdout
    assert "explained: not reachable: NULL is how reclaim_guest_pages ends its drain" in r.stdout


def test_a_hyp_mapping_that_cannot_be_made_panics_el2_and_is_reported_with_its_line(kernel, tmp_path):
    r = run_cli("inject", *FAST, "--site", "hyp_alloc_pages", "--pool", "hpool", "--nth", "1",
                "--runs-dir", str(tmp_path))
    assert r.returncode == 10, r.stdout + r.stderr           # a panic, whatever explains it
    assert "verdict: panicked" in r.stdout and "nVHE hyp BUG at: arch/arm64/kvm/hyp/nvhe/mem_protect.c" in r.stdout
    assert "explained: by design: hpool is sized" in r.stdout
    assert qemu_pids_mentioning(str(tmp_path)) == []
