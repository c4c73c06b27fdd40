"""Real builds, real QEMU, real pKVM: the verdicts the issue asks for, through the real CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from harness.errors import ExitCode
from harness.targets.base import TargetPanicked
from harness.targets.framing import readable
from harness.verdict import Outcome
from tests.integration.conftest import (
    HARNESS,
    assembled,
    qemu_pids_mentioning,
    run_cli,
    wait_until,
)


def _result(runs_dir):
    (run_dir,) = [p for p in runs_dir.iterdir() if p.is_dir() and not p.is_symlink()]
    return run_dir, json.loads((run_dir / "result.json").read_text())


def test_cpu_max_boots_protected_hvhe(kernel, tmp_path):
    r = run_cli("run", "--runs-dir", str(tmp_path), "--expect-mode", "hvhe", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir, result = _result(tmp_path)
    assert result["outcome"] == "pass" and result["exit_code"] == 0
    assert result["boot"]["pkvm_mode"] == "hVHE" and result["boot"]["cpu"] == "max"
    assert 0 < result["boot"]["seconds_to_pkvm"] < result["boot"]["seconds_to_ready"]
    # the version Debian's 6.12 source has today (it moves: .117, then .118), as the build recorded it
    assert result["kernel"]["version"] == kernel.meta["version"] and kernel.meta["version"].startswith("6.12.")
    assert result["kernel"]["cache_key"] == kernel.key
    assert "Protected hVHE mode initialized successfully" in (run_dir / "console.log").read_text(errors="replace")
    cmd = (run_dir / "qemu-cmd.sh").read_text()
    assert "virtualization=on,gic-version=3" in cmd and "kvm-arm.mode=protected" in cmd and "-cpu max" in cmd
    assert "CONFIG_KVM=y" in (run_dir / "kernel.config").read_text()
    assert "pass" in r.stdout.lower() and str(run_dir) in r.stdout
    assert not qemu_pids_mentioning(str(tmp_path))


def test_cortex_a72_boots_protected_nvhe(kernel, tmp_path):
    r = run_cli("run", "--runs-dir", str(tmp_path), "--cpu", "cortex-a72", "--expect-mode", "nvhe", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    _, result = _result(tmp_path)
    assert result["boot"]["pkvm_mode"] == "nVHE"


def test_wrong_expected_mode_is_a_test_failure(kernel, tmp_path):
    r = run_cli("run", "--runs-dir", str(tmp_path), "--cpu", "cortex-a72", "--expect-mode", "hvhe", "-q")
    assert r.returncode == 1
    assert "came up in nVHE mode, expected hVHE" in r.stdout


def test_missing_init_is_reported_as_a_panic_not_a_hang(kernel, tmp_path):
    r = run_cli("run", "--runs-dir", str(tmp_path), "--append", "rdinit=/no/such/init", "-q",
                "--boot-timeout", "60", timeout=120)
    assert r.returncode == ExitCode.PANIC, r.stdout + r.stderr
    _, result = _result(tmp_path)
    assert result["outcome"] == "panic" and result["events"][0]["kind"] == "kernel-panic"
    assert "Kernel panic - not syncing" in r.stdout           # the excerpt is printed
    assert result["boot"]["seconds_total"] < 30
    assert not qemu_pids_mentioning(str(tmp_path))


def test_protected_mode_overridden_is_reported_as_not_initialized(kernel, tmp_path):
    r = run_cli("run", "--runs-dir", str(tmp_path), "--append", "kvm-arm.mode=nvhe", "-q")
    assert r.returncode == 1, r.stdout + r.stderr
    _, result = _result(tmp_path)
    assert result["stage"] == "pkvm-init" and "pKVM did not initialize" in result["reason"]


def test_boot_timeout_kills_qemu(kernel, tmp_path):
    r = run_cli("run", "--runs-dir", str(tmp_path), "--boot-timeout", "0.5", "-q")
    assert r.returncode == ExitCode.TIMEOUT, r.stdout + r.stderr
    _, result = _result(tmp_path)
    assert result["outcome"] == "timeout" and "before the ready marker" in result["reason"]
    assert not qemu_pids_mentioning(str(tmp_path))


def test_qemu_dying_at_start_is_a_usage_error(kernel, tmp_path):
    r = run_cli("run", "--runs-dir", str(tmp_path), "--cpu", "no-such-cpu", "-q")
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "QEMU exited at start" in lines[0] and "no-such-cpu" in lines[0]


def test_ctrl_c_stops_qemu_and_exits_130(kernel, tmp_path):
    # PID 1 is a bare shell waiting at its prompt: the ready marker never comes, so the run is
    # still waiting for it when interrupted.
    proc = subprocess.Popen([*HARNESS, "run", "--runs-dir", str(tmp_path), "-q", "--boot-timeout", "120",
                             "--append", "rdinit=/bin/sh"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = wait_until(lambda: qemu_pids_mentioning(str(tmp_path)), 60)
        assert pids, "QEMU never started"
        time.sleep(3)                                   # well into the boot
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{p}") and p in qemu_pids_mentioning(str(tmp_path))
                                      for p in pids), 5)
    _, result = _result(tmp_path)
    assert result["outcome"] == "interrupted" and result["exit_code"] == 130


def test_host_access_to_hyp_memory_is_an_el2_bug(cache_dir, tmp_path):
    """Reading the hyp carveout from the host faults at stage 2; EL2 BUG()s in
    handle_host_mem_abort. The harness must call it an EL2 panic and say where."""
    target = assembled(cache_dir, tmp_path, payloads=False).start(tmp_path)
    try:
        m = re.search(r"Reserved \d+ MiB at (0x[0-9a-f]+)", target.console_text())
        assert m, "no hyp carveout line in dmesg"
        with pytest.raises(TargetPanicked):
            target.run(f"devmem {m.group(1)} 64", timeout=30)
    finally:
        started = time.monotonic()
        target.close()
    v = target.final_verdict()
    assert v.outcome is Outcome.PANIC, v.reason
    assert v.events[0].kind == "el2-bug"
    assert re.search(r"nVHE hyp BUG at: arch/arm64/kvm/hyp/nvhe/mem_protect\.c:\d+!", v.events[0].line)
    # What led to it, as the report shows the console: the command, then the BUG.
    shown = readable(target.console_text(), target.commands)
    bug_at = next(i for i, line in enumerate(shown) if "nVHE hyp BUG at" in line)
    assert any(line.startswith("$ devmem") for line in shown[max(0, bug_at - 5):bug_at]), shown[bug_at - 5:bug_at]
    assert time.monotonic() - started < 10                    # a hung, panicked host is not waited on
    assert not qemu_pids_mentioning(str(tmp_path))


def test_a_kernel_you_built_yourself_is_booted_as_it_is(kernel, cache_dir, tmp_path):
    """--kernel-build: the cache's own O= directory stands in for a developer's."""
    from harness.kernel.build import work_dir_for
    from harness.machine import build_request
    from harness.options import KernelOptions

    o_dir = work_dir_for(build_request(KernelOptions(), cache_dir, quiet=True))
    r = run_cli("run", "--kernel-build", str(o_dir), "--runs-dir", str(tmp_path), "--json", "-q")
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["kernel"]["source"] == f"prebuilt:{o_dir.resolve()}" and result["outcome"] == "pass"
    assert result["schema_version"] == 1 and result["kernel"]["version"] == kernel.meta["version"]


def test_the_developer_loop_builds_boots_runs_and_sums_up(kernel, tmp_path):
    r = run_cli("test", "--suites", "smoke", "-k", "exit_status or protected_mode or payload_creates",
                "--runs-dir", str(tmp_path), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    summary = r.stdout.split("pkvm-harness test summary", 1)[1]
    assert "tests:   3 ran: 3 passed, 0 failed, 0 errors" in summary and "result:  PASS (exit 0)" in summary
    run_dir, result = _result(tmp_path)
    assert f"run dir: {run_dir}" in summary and result["summary"]["passed"] == 3
    assert not qemu_pids_mentioning(str(tmp_path))
