"""Nothing outlives a harness killed with SIGKILL (as a CI runner's timeout does): QEMU is killed
by the kernel when the harness dies (PR_SET_PDEATHSIG, harness/procs.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from harness import REPO_ROOT
from tests.integration.conftest import HARNESS, qemu_pids_mentioning, wait_until

GONE_WITHIN = 5.0


def _kill_and_check(victim: subprocess.Popen, marker: str) -> None:
    """SIGKILL `victim` and assert that the QEMUs whose command line has `marker` are gone in
    GONE_WITHIN seconds; whatever is left is killed here, by PID, before the test fails."""
    pids = wait_until(lambda: qemu_pids_mentioning(marker) or victim.poll() is not None, 180, step=0.02)
    if pids is True or not pids:
        victim.kill()
        out = victim.communicate(timeout=30)[0]
        pytest.fail(f"no QEMU mentioning {marker} appeared; the harness said: {out[-2000:]!r}")
    if victim.poll() is not None:
        left = qemu_pids_mentioning(marker)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the harness exited (status {victim.returncode}) before it could be killed")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(30)
    killed_at = time.monotonic()
    gone = wait_until(lambda: not qemu_pids_mentioning(marker), GONE_WITHIN, step=0.02)
    left = qemu_pids_mentioning(marker)
    for pid in left:                      # leave nothing behind, then fail
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert gone and not left, (f"QEMU {left} still running {time.monotonic() - killed_at:.1f}s after "
                               f"the harness was SIGKILLed (killed by the test)")


def test_sigkilled_run_leaves_no_qemu(kernel, initramfs, tmp_path):
    """A real `python -m harness run` killed while QEMU boots: QEMU goes with it."""
    runs = tmp_path / "runs"
    # Its own session: the SIGKILL is the harness's alone (nothing else in the group is signalled).
    victim = subprocess.Popen([*HARNESS, "run", "-q", "--runs-dir", str(runs)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _kill_and_check(victim, str(runs))


_PTY_PARENT = r"""
import dataclasses, sys, time
from pathlib import Path
from harness.image.initramfs import READY_MARKER
from harness.targets.qemu import QemuMachine, QemuSpec
kernel, initrd, run_dir = map(Path, sys.argv[1:4])
extra = {"ready_marker": READY_MARKER} if "ready_marker" in {f.name for f in dataclasses.fields(QemuSpec)} else {}
spec = QemuSpec(kernel=kernel, initrd=initrd, qmp_socket=run_dir / "qmp.sock", console_pty=True, **extra)
m = QemuMachine(spec, run_dir / "console.log")
m.start()
print(m.pid, flush=True)
time.sleep(300)
"""


def test_sigkilled_harness_leaves_no_qemu_on_a_pty(kernel, initramfs, tmp_path):
    """The pty console (`boot --interactive`) is spawned by pexpect: the same holds."""
    run_dir = tmp_path / "pty-run"
    run_dir.mkdir()
    victim = subprocess.Popen([sys.executable, "-c", _PTY_PARENT, str(kernel.image), str(initramfs.path),
                               str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=REPO_ROOT, start_new_session=True)
    _kill_and_check(victim, str(run_dir))
