"""Bad input: a one-line error that says what to do, exit code 2, and nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest

HARNESS = [sys.executable, "-m", "harness"]


def cli(*args, cache):
    return subprocess.run([*HARNESS, *args, "--cache-dir", str(cache)], capture_output=True, text=True, timeout=120)


def _one_line_usage_error(r):
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("pkvm-harness: error: ")
    return lines[0]


def test_kernel_src_that_does_not_exist(tmp_path):
    line = _one_line_usage_error(cli("build", "--kernel-src", str(tmp_path / "nope"), cache=tmp_path / "c"))
    assert "does not exist" in line and "--kernel-src" in line
    assert not (tmp_path / "c").exists()


def test_tree_that_is_not_linux(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "Makefile").write_text("all:\n\techo hi\n")
    line = _one_line_usage_error(cli("build", "--kernel-src", str(tmp_path / "src"), cache=tmp_path / "c"))
    assert "not a Linux kernel tree" in line and "pass the root of a kernel checkout" in line
    assert not (tmp_path / "c").exists()


def test_unknown_fragment(tmp_path):
    line = _one_line_usage_error(cli("build", "--config", "no-such.config", cache=tmp_path / "c"))
    assert "no-such.config" in line and "pkvm.config" in line
    assert not (tmp_path / "c").exists()


def test_malformed_kconfig_option(tmp_path):
    line = _one_line_usage_error(cli("build", "--kconfig", "CONFIG_KVM=maybe", cache=tmp_path / "c"))
    assert "CONFIG_KVM" in line


def test_missing_cross_compiler(tmp_path):
    from tests.unit.test_cache_key import _linux_tree
    tree = _linux_tree(tmp_path / "linux")
    line = _one_line_usage_error(cli("build", "--kernel-src", str(tree), "--cross-compile", "/nonexistent/aarch64-",
                                     cache=tmp_path / "c"))
    assert "cross compiler /nonexistent/aarch64-gcc not found" in line and "make setup" in line
    assert not (tmp_path / "c" / "kernels").exists() and not (tmp_path / "c" / "build").exists()


@pytest.mark.parametrize("cmd", ["run", "boot"])
def test_missing_qemu(tmp_path, cmd):
    from tests.unit.test_cache_key import _linux_tree
    tree = _linux_tree(tmp_path / "linux")
    runs = tmp_path / "runs"
    line = _one_line_usage_error(cli(cmd, "--kernel-src", str(tree), "--qemu", str(tmp_path / "no-qemu"),
                                     "--runs-dir", str(runs), cache=tmp_path / "c"))
    assert "QEMU binary" in line and "not found" in line and "--qemu" in line
    assert not runs.exists()
    assert not (tmp_path / "c" / "kernels").exists()


def test_argparse_errors_are_one_line_with_the_same_code(tmp_path):
    line = _one_line_usage_error(cli("run", "--smp", "two", cache=tmp_path / "c"))
    assert "--smp" in line and "'two' is not a whole number" in line and "pkvm-harness run --help" in line
    line = _one_line_usage_error(subprocess.run([*HARNESS, "no-such-command"], capture_output=True, text=True))
    assert "invalid choice: 'no-such-command'" in line


@pytest.mark.parametrize("content, says", [
    ("this is not json\n", "not JSON lines"),
    ('{"hello": "world"}\n', "is not a saved trace"),
    ('[1, 2, 3]\n', "is not a saved trace"),
    ("", "is not a saved trace"),
])
def test_replay_of_something_that_is_not_a_trace(tmp_path, content, says):
    """Non-JSON, JSON of another shape, or a trace whose snapshot is another shape: one line, exit 2."""
    (tmp_path / "trace.jsonl").write_text(content)
    (tmp_path / "snapshot-initial.json").write_text('{"pools": {"1": {"name": "hpool"}}}' if not content else "{}")
    line = _one_line_usage_error(subprocess.run([*HARNESS, "replay", str(tmp_path / "trace.jsonl")],
                                                capture_output=True, text=True, timeout=60))
    assert says in line and "trace.jsonl" in line


def test_replay_of_a_file_without_its_snapshot(tmp_path):
    (tmp_path / "trace.jsonl").write_text("")
    line = _one_line_usage_error(subprocess.run([*HARNESS, "replay", str(tmp_path / "trace.jsonl")],
                                                capture_output=True, text=True, timeout=60))
    assert "incomplete trace" in line and "snapshot-initial.json" in line


def test_bisect_bad_input_is_one_line_with_exit_2(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    for i in range(3):
        (repo / "f").write_text(str(i))
        git("add", "-A")
        git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", f"c{i}")
    runs = ["--runs-dir", str(tmp_path / "runs")]
    _one_line_usage_error(cli("bisect", "--repo", str(repo), *runs, cache=tmp_path / "c"))
    r = cli("bisect", "--repo", str(repo), "--good", "HEAD", "--bad", "HEAD~2", *runs, cache=tmp_path / "c")
    _one_line_usage_error(r)
    assert "not an ancestor" in r.stderr
    r = cli("bisect", "--repo", str(repo), "--good", "nope", "--bad", "HEAD", *runs, cache=tmp_path / "c")
    _one_line_usage_error(r)
    assert "'nope' is not a commit" in r.stderr
    _one_line_usage_error(cli("bisect", "--resume", str(tmp_path), cache=tmp_path / "c"))
    assert not (tmp_path / "runs").exists()                    # nothing half-made


@pytest.mark.parametrize("args, says", [
    (("--site", "hyp_alloc_pages"), "--site and --nth go together"),
    (("--sweep", "--site", "hyp_alloc_pages", "--nth", "1"), "--sweep fails every call in turn"),
    (("--pool", "vm"), "--pool narrows --site's count"),
    (("--pool", "nopool", "--site", "hyp_alloc_pages", "--nth", "1"), "invalid choice: 'nopool'"),
    (("--site", "kmalloc", "--nth", "1"), "invalid choice: 'kmalloc'"),
])
def test_inject_refuses_a_plan_that_cannot_be_run_before_building(tmp_path, args, says):
    line = _one_line_usage_error(cli("inject", *args, "--runs-dir", str(tmp_path / "runs"), cache=tmp_path / "c"))
    assert says in line
    assert not (tmp_path / "c").exists() and not (tmp_path / "runs").exists()
