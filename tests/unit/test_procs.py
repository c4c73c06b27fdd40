"""harness/procs.py: children die with a SIGKILLed parent, a build's whole group too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from harness import procs

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    left = [p for p in pids if _alive(p)]
    for p in left:                                   # never leave anything behind
        os.kill(p, signal.SIGKILL)
    return left


def test_a_parent_that_died_before_prctl_is_noticed(monkeypatch):
    monkeypatch.setattr(os, "getpid", lambda: 1)     # "the parent" is not the child's parent
    preexec = procs.die_with_parent(signal.SIGKILL)
    monkeypatch.undo()
    r = subprocess.run(["sleep", "5"], preexec_fn=preexec, timeout=10)
    assert r.returncode == -signal.SIGKILL


# A parent that starts children as the harness does, prints their PIDs and sleeps.
_PARENT = r"""
import signal, subprocess, sys, time
from harness import procs
kind = sys.argv[1]
if kind == "plain":
    p = subprocess.Popen(["sleep", "60"], preexec_fn=procs.die_with_parent(signal.SIGKILL))
    print(p.pid, flush=True)
else:   # a build: a shell with a child of its own, in a group with a guard
    p = subprocess.Popen(["sh", "-c", "sleep 61 & echo $!; sleep 62; wait"], stdout=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=procs.die_with_parent(signal.SIGTERM))
    guard = procs.GroupGuard(p.pid, grace=1.0)
    print(p.pid, p.stdout.readline().strip(), guard.proc.pid, flush=True)
time.sleep(60)
"""


def _start_parent(kind: str) -> tuple[subprocess.Popen, list[int]]:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, kind], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert parent.stdout is not None
    return parent, [int(x) for x in parent.stdout.readline().split()]


def test_child_dies_with_a_sigkilled_parent():
    parent, (child,) = _start_parent("plain")
    assert _alive(child)
    parent.kill()
    parent.wait()
    assert _wait_gone([child], 5) == []


def test_group_guard_ends_the_whole_group_of_a_sigkilled_parent():
    parent, (shell, grandchild, guard) = _start_parent("group")
    assert _alive(shell) and _alive(grandchild)
    parent.kill()
    parent.wait()
    # the grandchild (not covered by PR_SET_PDEATHSIG) is ended by the guard, which then exits
    assert _wait_gone([shell, grandchild], 5) == []
    assert _wait_gone([guard], 5) == []


def test_group_guard_dismissed_leaves_the_group_alone():
    p = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        with procs.GroupGuard(p.pid, grace=0.5) as guard:
            pass
        assert guard.proc.returncode == 0
        time.sleep(0.2)
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


def test_run_group_kills_the_group_at_its_deadline():
    t = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        procs.run_group(["sh", "-c", "sleep 30 & sleep 31; wait"], timeout=0.5)
    assert time.monotonic() - t < 10
    assert procs.run_group(["sh", "-c", "exit 3"]) == 3
