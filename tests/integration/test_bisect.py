"""pkvm-harness bisect on a real kernel history (tests/integration/kernel_history.py): it must
name the allocator regression, skip the commit that does not build, and leave the repository
as it was. The first run builds the worktree's kernel cold (about 10 minutes); later steps and
later runs are incremental. Marked slow: `make test-slow`."""

from __future__ import annotations

import json
import statistics
import subprocess

import pytest

from tests.integration.conftest import HARNESS, qemu_pids_mentioning
from tests.integration.kernel_history import kernel_history


def _bisect(repo, cache_dir, tmp_path, good: str, bad: str, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """The real CLI's bisect; its exit status must be 0 (a first bad commit found); its report.json."""
    r = subprocess.run([*HARNESS, "bisect", "--repo", str(repo), "--good", good, "--bad", bad, *args,
                        "--runs-dir", str(tmp_path), "--cache-dir", str(cache_dir)],
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir() and not p.is_symlink())
    return r, json.loads((run_dir / "report.json").read_text())


@pytest.mark.slow
def test_bisect_names_the_allocator_regression_on_a_real_history(kernel, cache_dir, tmp_path):
    repo, revs = kernel_history(cache_dir)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    r, report = _bisect(repo, cache_dir, tmp_path, revs["base"], revs["doc5"], "--suites", "allocator",
                        "-k", "lifecycles")
    assert report["first_bad"] == revs["regression"], r.stdout[-3000:]
    assert report["subject"].startswith("KVM: arm64: pkvm: put freed pages at the head")
    assert "test_vm_lifecycles" in report["reason"] and "first divergence" in report["reason"]
    assert "the kernel returned" in report["excerpt"] and "the model predicts" in report["excerpt"]
    order = list(revs.values())
    assert revs["break"] in [s["rev"] for s in report["steps"]], "the bisect never met the unbuildable commit"
    for step in report["steps"]:
        i = order.index(step["rev"])
        want = "skip" if step["rev"] == revs["break"] else ("bad" if i >= order.index(revs["regression"]) else "good")
        assert step["outcome"] == want, step
    assert f"first bad commit: {revs['regression']}" in r.stdout
    seconds = [s["seconds"] for s in report["steps"]]
    print(f"bisect: {len(seconds)} steps, median {statistics.median(seconds):.0f} s, total {sum(seconds):.0f} s")
    after = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True).stdout
    assert after == head and status == "" and "refs/bisect" not in subprocess.run(
        ["git", "-C", str(repo), "for-each-ref"], capture_output=True, text=True).stdout
    assert not qemu_pids_mentioning(str(tmp_path))


@pytest.mark.slow
def test_a_kernel_whose_pkvm_init_deadlocks_is_bad_not_skipped(kernel, cache_dir, tmp_path):
    """A commit whose boot hangs (pKVM init deadlocks at EL2) is the regression, not a step that
    cannot be judged: the suite session ends on the harness's timeout code, and bisect calls it bad."""
    repo, revs = kernel_history(cache_dir)
    r, report = _bisect(repo, cache_dir, tmp_path, revs["unhead"], revs["doc7"], "--suites", "boot",
                        "--boot-timeout", "60")
    assert report["first_bad"] == revs["deadlock"], r.stdout[-3000:]
    hung = [s for s in report["steps"] if s["rev"] in (revs["deadlock"], revs["doc7"])]
    assert hung and all(s["outcome"] == "bad" for s in hung), report["steps"]
    # Hung to the deadline, or (a watchdog on the other CPU) called a lockup: either way not "cannot judge".
    assert report["reason"].startswith(("the target hung", "the kernel or EL2 panicked", "panic:")), report["reason"]
    assert not qemu_pids_mentioning(str(tmp_path))
