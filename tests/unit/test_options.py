"""The kernel and boot options are declared once (harness.options): the CLI and the pytest plugin
expose the same ones with the same defaults, the plugin's are all --pkvm-*, options survive the
trip to a child pytest (the bisect runner), and a pytest session that does not ask for the harness
gets nothing from it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import cli, options
from harness.options import BootOptions, KernelOptions

ROOT = Path(__file__).resolve().parents[2]

DUMP_TEST = '''
import json, os
from harness import options

def test_dump(pytestconfig):
    values = {o.dest: pytestconfig.getoption("pkvm_" + o.dest) for o in options.ALL}
    with open(os.environ["DUMP_TO"], "w") as f:
        json.dump(values, f, default=str)
'''


def _plugin_values(tmp_path: Path, *args: str) -> dict:
    (tmp_path / "test_dump.py").write_text(DUMP_TEST)
    out = tmp_path / "values.json"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_dump.py"),
                        *args], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={"DUMP_TO": str(out), "PATH": "/usr/bin:/bin", "PKVM_HARNESS_RUNS": str(tmp_path / "runs"),
                            "HOME": str(Path.home())})
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(out.read_text())


def _cli_values(*args: str) -> dict:
    ns = cli.parser().parse_args(["run", *args])
    return {o.dest: getattr(ns, o.dest) for o in options.ALL}


def test_the_cli_and_the_plugin_expose_the_same_options_with_the_same_defaults(tmp_path):
    cli_values = {k: (str(v) if isinstance(v, Path) else v) for k, v in _cli_values().items()}
    assert _plugin_values(tmp_path) == cli_values
    # ... and the same spellings: every declared option is --<name> on `run` and --pkvm-<name> in pytest.
    help_text = subprocess.run([sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"],
                               capture_output=True, text=True, timeout=120, cwd=tmp_path).stdout
    run_help = subprocess.run([sys.executable, "-m", "harness", "run", "--help"], capture_output=True, text=True,
                              timeout=60).stdout
    for name in options.names():
        assert f"--pkvm-{name}" in help_text and f"--{name}" in run_help, name


def test_the_plugin_adds_only_prefixed_options(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"],
                               capture_output=True, text=True, timeout=120, cwd=tmp_path).stdout
    section = help_text.split("pKVM harness:", 1)[1].split("\n\n", 1)[0]
    flags = [line.split()[0].rstrip(",=") for line in section.splitlines()[1:] if line.strip().startswith("-")]
    assert len(flags) > len(options.ALL)
    assert all(f.startswith("--pkvm-") for f in flags), flags


def test_one_spelling_of_the_mode_in_both(tmp_path):
    assert _cli_values("--expect-mode", "hvhe")["expect_mode"] == "hVHE"
    assert _plugin_values(tmp_path, "--pkvm-expect-mode", "NVHE")["expect_mode"] == "nVHE"
    with pytest.raises(SystemExit) as e:
        cli.parser().parse_args(["run", "--expect-mode", "vhe"])
    assert e.value.code == 2


def test_options_reach_a_child_pytest_unchanged(tmp_path):
    """What the bisect runner does: options -> plugin arguments -> the child's options."""
    kopts = KernelOptions(kernel="6.1", fragments=["debug.config"], kconfig=["CONFIG_X=y", "CONFIG_Y=n"],
                          patches=[tmp_path / "a.patch"], jobs=3, build_timeout=99.0)
    bopts = BootOptions(cpu="cortex-a72", smp=3, mem="2G", append=["quiet", "a=b c"], qemu_args=["-s"],
                        boot_timeout=33.0, expect_mode="nVHE")
    got = _plugin_values(tmp_path, *options.to_argv(kopts, bopts, tmp_path / "cache"))
    want = {**vars(kopts), **vars(bopts), "cache_dir": tmp_path / "cache"}
    assert got == {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if k == "patches" else v)
                   for k, v in want.items()}
    assert options.parse_argv(options.to_argv(kopts, bopts, tmp_path, prefix="--")) == (kopts, bopts)


def test_a_session_that_does_not_ask_for_the_harness_gets_nothing_from_it(tmp_path):
    (tmp_path / "test_plain.py").write_text("def test_plain():\n    assert 1 + 1 == 2\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--setup-show", "-p", "no:cacheprovider",
                        "test_plain.py"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={"PATH": "/usr/bin:/bin", "PKVM_HARNESS_RUNS": str(tmp_path / "runs"),
                            "HOME": str(Path.home()), "PYTHONDONTWRITEBYTECODE": "1"})
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_plain.py"]     # no runs/, no junit.xml
    assert "SETUP" not in r.stdout, r.stdout                 # no fixture of ours (autouse) was set up


@pytest.mark.parametrize("args, says", [
    (["--mem", "banana"], "'banana' is not a memory size"),
    (["--mem", "64"], "too little memory"),
    (["--smp", "0"], "0 must be 1 or more"),
    (["--ram-regions", "1G"], "'1G' is not a list of RAM region sizes"),
    (["--ram-regions", "100M,100M"], "too little memory"),
    (["--boot-timeout", "-1"], "must be more than 0 seconds"),
    (["--jobs", "x"], "'x' is not a whole number"),
])
def test_bad_values_are_one_line_errors_with_exit_2(args, says):
    r = subprocess.run([sys.executable, "-m", "harness", "run", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pkvm-harness: error: run: ") and says in lines[0], r.stderr
