"""Proof that the suites catch real EL2 memory bugs: each patch in tests/mutants/ is built (in
the one re-patched tree, so incrementally) and the boot, allocator and stage2 suites run on it.
Each mutant must fail them, with a message that matches its `Expect:` line. The stock kernel
must pass the same suites first, or a "catch" would mean nothing. `make test-mutants` (the
default kernel) or `make test-mutants KERNEL=7.3` (--mutant-kernel: the mutants written for it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.junit import failures

REPO = Path(__file__).resolve().parents[2]
# hostile skips itself unless the mutant's kernel has the hostile host (Options: --pkvm-config ...)
SUITES = [str(REPO / "test_suites" / s) for s in ("boot", "allocator", "stage2", "hostile")]
RESULTS: dict[str, dict] = {}      # mutant -> what caught it, for the table (conftest.py prints it)


@pytest.fixture(scope="session")
def kernel(request) -> str:
    return request.config.getoption("--mutant-kernel")


@pytest.fixture(scope="session")
def over_ssh(request) -> bool:
    return request.config.getoption("--mutant-target") == "ssh"


def run_suites(tmp_path: Path, kernel: str, patch: Path | None,
               options: tuple[str, ...] = (), over_ssh: bool = False) -> tuple[int, list, int, str]:
    junit = tmp_path / "junit.xml"
    argv = [sys.executable, "-m", "pytest", *SUITES, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
            "--pkvm-run-dir", str(tmp_path / "run"), "--pkvm-seed", "1", "--pkvm-kernel", kernel]
    if patch is not None:
        argv += ["--pkvm-patch", str(patch), *options]
    if not over_ssh:
        r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=3600)
    else:
        r = _over_ssh(tmp_path, kernel, patch, options, [*argv, "--pkvm-config", "pkvm-el2-dump"])
    if not junit.is_file():
        pytest.fail(f"the suites did not run (exit {r.returncode}): {(r.stdout + r.stderr)[-800:]}")
    failed, total = failures(junit)
    result = tmp_path / "run" / "result.json"
    session = json.loads(result.read_text()) if result.is_file() else {}
    if session.get("outcome") == "error" and not failed:
        # the session never judged the kernel (its target was not usable): neither caught nor missed
        pytest.fail(f"the suites could not judge this kernel: {session.get('reason')}")
    return r.returncode, failed, total, r.stdout[-3000:]


@pytest.mark.mutant
def test_the_stock_kernel_passes_the_suites(tmp_path, kernel, over_ssh):
    code, failed, total, out = run_suites(tmp_path, kernel, None, over_ssh=over_ssh)
    assert code == 0 and failed == [] and total > 10, out


def _over_ssh(tmp_path: Path, kernel: str, patch: Path | None, options: tuple[str, ...],
              argv: list[str]) -> subprocess.CompletedProcess:
    """The kernel (with the EL2 dump) booted under QEMU and the suites run against it as a board."""
    from harness.image.keys import ensure_keys
    from harness.options import KernelOptions
    from harness.paths import default_cache_dir
    from tests.integration.conftest import assembled

    cache = default_cache_dir()
    given = dict(zip(options[::2], options[1::2]))      # the mutant's Options: --pkvm-<option> VALUE pairs
    configs = [options[i + 1] for i, o in enumerate(options[:-1]) if o == "--pkvm-config"]
    kopts = KernelOptions(kernel=kernel, fragments=["pkvm-el2-dump", *configs], patches=[patch] if patch else [],
                          el2_debug=given.get("--pkvm-el2-debug", "on"))
    machine = assembled(cache, tmp_path, kopts)
    target = machine.start(tmp_path, "ssh")
    try:
        keys = ensure_keys(cache)
        kh = tmp_path / "known_hosts"
        kh.write_text(f"[127.0.0.1]:{target.spec.ssh_port} {keys.host_public_line}\n")
        return subprocess.run([*argv, "--pkvm-target", f"ssh://root@127.0.0.1:{target.spec.ssh_port}",
                               "--pkvm-ssh-key", str(keys.client_private), "--pkvm-ssh-known-hosts", str(kh)],
                              cwd=REPO, capture_output=True, text=True, timeout=3600)
    finally:
        target.close()


def run_sweep(tmp_path: Path, kernel: str, patch: Path, workload: str) -> tuple[int, str]:
    """`pkvm-harness inject --sweep` on the mutant's kernel: its exit code and its table."""
    argv = [str(Path(sys.executable).with_name("pkvm-harness")), "inject", "--sweep", "--workload", workload,
            "--kernel", kernel, "--patch", str(patch), "--el2-plugin", "off", "--runs-dir", str(tmp_path / "sweep"),
            "-q"]
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=3600)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.mutant
def test_the_suites_catch_the_mutant(tmp_path, kernel, mutant, over_ssh):   # mutant: conftest.pytest_generate_tests
    if mutant.sweep:
        if over_ssh:
            pytest.skip("an error-path mutant is caught by the fault sweep, which needs QEMU's gdbstub")
        return check_error_path_mutant(tmp_path, kernel, mutant)
    code, failed, total, out = run_suites(tmp_path, kernel, mutant.path, mutant.options, over_ssh)
    RESULTS[mutant.name] = {"bug": mutant.bug, "caught_by": sorted({f.test for f in failed}), "tests": total,
                            "options": " ".join(mutant.options),
                            "pointed": any(mutant.expect.search(f.message) for f in failed)}
    assert failed, f"{mutant.name} passed every suite ({total} tests): not caught\n{out}"
    assert code != 0
    if over_ssh:       # a board lacks the QEMU-only tests (replay from power-on, transitions) an Expect may name
        return
    assert RESULTS[mutant.name]["pointed"], (
        f"{mutant.name} was caught, but no failure message matches /{mutant.expect.pattern}/:\n"
        + "\n---\n".join(f"{f.test}: {f.message[:600]}" for f in failed))


def check_error_path_mutant(tmp_path: Path, kernel: str, mutant) -> None:
    """An error-path bug: the suites (the happy path) must miss it, the fault sweep must catch it."""
    code, failed, total, out = run_suites(tmp_path, kernel, mutant.path, mutant.options)
    assert code == 0 and failed == [], (f"{mutant.name} is an error-path mutant, but the happy-path suites "
                                        f"caught it: {[f.test for f in failed]}\n{out}")
    code, table = run_sweep(tmp_path, kernel, mutant.path, mutant.sweep)
    pointed = bool(mutant.expect.search(table))
    RESULTS[mutant.name] = {"bug": mutant.bug, "caught_by": [f"pkvm-harness inject --sweep ({mutant.sweep})"]
                            if code == 1 else [], "tests": total, "options": " ".join(mutant.options),
                            "pointed": pointed}
    assert code == 1, f"{mutant.name}: the sweep found nothing (exit {code}):\n{table[-3000:]}"
    assert pointed, f"{mutant.name} was caught by the sweep, but no row matches /{mutant.expect.pattern}/:\n{table}"


def write_table(path: Path) -> str:
    lines = ["| mutant | run with | caught by | points at the bug |", "|---|---|---|---|"]
    for name, r in RESULTS.items():
        caught = "<br>".join(r["caught_by"]) or "**not caught**"
        lines.append(f"| {name} | {r['options'] or 'defaults'} | {caught} | {'yes' if r['pointed'] else 'no'} |")
    table = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / f"{path.name}.md").write_text(table)         # not with_suffix: "mutants-7.3"
    (path.parent / f"{path.name}.json").write_text(json.dumps(RESULTS, indent=2) + "\n")
    return table
