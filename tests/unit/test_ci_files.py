"""The nightly workflow, the CI scripts and the Vagrantfile: parsed and checked, not just present."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "nightly.yml"


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _triggers(wf: dict) -> dict:
    return wf.get("on", wf.get(True))        # YAML 1.1 reads a bare `on` key as true


def _runs(job: dict) -> list[str]:
    return [s["run"] for s in job["steps"] if "run" in s]


def _uses(job: dict) -> list[str]:
    return [s["uses"].split("@")[0] for s in job["steps"] if "uses" in s]


def test_the_workflow_runs_nightly_and_on_demand_with_a_kernel_url_input(workflow):
    on = _triggers(workflow)
    assert re.fullmatch(r"[\d*/,-]+( [\d*/,-]+){4}", on["schedule"][0]["cron"])
    inputs = on["workflow_dispatch"]["inputs"]
    assert set(inputs) == {"kernel_git_url", "kernel_ref"}
    assert inputs["kernel_git_url"]["default"] == "" and not inputs["kernel_git_url"]["required"]


def test_the_matrix_covers_hvhe_and_nvhe_and_an_optional_git_kernel(workflow):
    suites = workflow["jobs"]["suites"]
    matrix = suites["strategy"]["matrix"]
    assert matrix["cpu"] == ["max", "cortex-a72"]
    assert suites["strategy"]["fail-fast"] is False
    expr = matrix["kernel"]
    assert "inputs.kernel_git_url" in expr
    assert '\'["debian-6.12", "debian-6.1", "debian-7.3", "git"]\'' in expr
    assert '\'["debian-6.12", "debian-6.1", "debian-7.3"]\'' in expr
    assert suites["container"].startswith("debian:12")


def test_the_suites_job_sets_up_caches_runs_uploads_and_publishes(workflow):
    suites = workflow["jobs"]["suites"]
    runs = "\n".join(_runs(suites))
    assert "make setup" in runs                                  # the README's set-up command
    assert "ci/nightly.sh" in runs and '--cpu "$CPU"' in runs and "--kernel-git" in runs
    assert '--kernel "${KERNEL#debian-}"' in runs                # debian-6.1 -> --kernel 6.1
    uses = _uses(suites)
    assert uses.index("actions/cache/restore") < uses.index("actions/cache/save")
    save = next(s for s in suites["steps"] if s.get("uses", "").startswith("actions/cache/save"))
    restore = next(s for s in suites["steps"] if s.get("uses", "").startswith("actions/cache/restore"))
    assert save["if"] == "always()" and save["with"]["key"] == restore["with"]["key"]
    assert ".cache/pkvm-harness/kernels" in restore["with"]["path"]
    assert ".cache/pkvm-harness/debian" in restore["with"]["path"]          # the fetched 7.x sources
    upload = next(s for s in suites["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and upload["with"]["path"].startswith("nightly")
    # inputs reach the shell through the environment, never pasted into the script
    assert "${{" not in runs


def test_a_cell_runs_another_machine_shape(workflow):
    suites = workflow["jobs"]["suites"]
    shaped = [c for c in suites["strategy"]["matrix"]["include"] if c.get("ram_regions")]
    assert shaped and all(len(c["ram_regions"].split(",")) >= 2 for c in shaped)
    runs = "\n".join(step.get("run", "") for step in suites["steps"])
    assert '--pkvm-ram-regions "$RAM_REGIONS"' in runs and "two-regions" in suites["env"]["CELL"]


def test_the_summary_job_renders_every_cell_after_the_matrix(workflow):
    summary = workflow["jobs"]["summary"]
    assert summary["needs"] == "suites" and summary["if"] == "always()"
    assert "actions/download-artifact" in _uses(summary)
    assert any("ci/summary.sh" in r for r in _runs(summary))


def test_the_mutants_run_nightly_as_their_own_job_on_both_series(workflow):
    job = workflow["jobs"]["mutants"]
    assert job["strategy"]["matrix"]["kernel"] == ["6.12", "7.3"]
    runs = [step.get("run", "") for step in job["steps"]]
    assert "make setup" in runs and "make test-mutants KERNEL=${{ matrix.kernel }}" in runs
    assert any("runs/mutants-" in str(step.get("with", {}).get("path", "")) for step in job["steps"])


def test_every_script_the_workflow_names_exists_and_is_executable(workflow):
    named = set()
    for job in workflow["jobs"].values():
        for run in _runs(job):
            named.update(re.findall(r"(?<![\w/])(ci/[\w./-]+\.sh)", run))
    assert named >= {"ci/nightly.sh", "ci/setup.sh", "ci/summary.sh"}
    for script in named:
        assert (ROOT / script).is_file(), script
        assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"
    make_targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
    for job in workflow["jobs"].values():
        for target in re.findall(r"\bmake (\w[\w-]*)", "\n".join(_runs(job))):
            assert target in make_targets


def _shell_scripts() -> list[Path]:
    found = [ROOT / ".ci" / "run"]
    for path in sorted((ROOT / "ci").iterdir()):
        if path.suffix == ".sh" or path.read_bytes()[:2] == b"#!":
            found.append(path)
    return found


def test_shellcheck_passes_on_every_shell_script():
    scripts = _shell_scripts()
    assert {p.name for p in scripts} >= {"run", "setup.sh", "nightly.sh", "summary.sh"}
    r = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_vagrantfile_provisions_with_the_same_setup_script_as_make_run():
    text = (ROOT / "Vagrantfile").read_text()
    provision = re.findall(r'config\.vm\.provision .*', text)
    assert provision and all("ci/setup.sh" in p for p in provision)
    assert re.search(r'^setup:\n\tci/setup\.sh', (ROOT / "Makefile").read_text(), re.M)   # what `make run` runs
    assert re.search(r'^run: setup$', (ROOT / "Makefile").read_text(), re.M)
    assert 'config.vm.box = ENV.fetch("PKVM_VM_BOX", "debian/bookworm64")' in text
    assert "vagrant up && vagrant ssh -c 'cd /vagrant && make run'" in (ROOT / "README.md").read_text()


@pytest.mark.skipif(shutil.which("ruby") is None, reason="Ruby is not installed (ci/setup.sh --test-tools adds it)")
def test_ruby_accepts_the_vagrantfile():
    r = subprocess.run(["ruby", "-c", str(ROOT / "Vagrantfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Syntax OK" in r.stdout, r.stderr


def test_ci_run_calls_the_readme_test_command_and_prints_pytest_summaries():
    text = (ROOT / ".ci" / "run").read_text()
    assert "make test" in text
    assert "make test" in (ROOT / "README.md").read_text()
    assert re.search(r"grep .*(passed|failed)", text), "the pytest summary lines are printed at the end"


def test_the_summary_script_renders_every_cell_into_one_report(tmp_path):
    golden = ROOT / "tests" / "golden" / "report-mutant01"
    for cell in ("debian-6.12-max", "debian-6.1-cortex-a72"):
        shutil.copytree(golden, tmp_path / cell / "suites")
    (tmp_path / "broken-cell").mkdir()                     # a cell that left nothing: not fatal
    r = subprocess.run([str(ROOT / "ci" / "summary.sh"), str(tmp_path)], capture_output=True, text=True,
                       timeout=120, env={k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("| suites on QEMU -cpu max (hVHE), Linux 6.12.117 | **FAIL** |") == 2
    assert (tmp_path / "report.html").read_text().count('class="verdict fail"') >= 2
    empty = tmp_path / "empty"
    empty.mkdir()
    r = subprocess.run([str(ROOT / "ci" / "summary.sh"), str(empty)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no cell under" in r.stderr


def test_every_debian_kernel_also_runs_as_it_ships_without_el2_debug(workflow):
    matrix = workflow["jobs"]["suites"]["strategy"]["matrix"]
    assert matrix["el2_debug"] == ["on"]
    off = {cell["kernel"] for cell in matrix["include"] if cell["el2_debug"] == "off"}
    assert off == {"debian-6.12", "debian-6.1", "debian-7.3"}
    runs = " ".join(step.get("run", "") for step in workflow["jobs"]["suites"]["steps"])
    assert runs.count('--el2-debug "$EL2_DEBUG"') == 2
