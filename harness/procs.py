"""Child processes that do not outlive the harness, even when it is killed with SIGKILL.

SIGINT and SIGTERM reach the harness's own handlers, which stop QEMU and builds; SIGKILL runs no
handler at all. Every process the harness starts is therefore asked, in the child between fork
and exec, to be signalled when its parent dies (Linux's PR_SET_PDEATHSIG):

    subprocess.Popen(argv, preexec_fn=die_with_parent())
    pexpect.spawn(cmd, args, preexec_fn=die_with_parent())

A build (`make`) has its own children (sub-makes, shells, cc1, ld), which PR_SET_PDEATHSIG on make
does not cover: the setting is not inherited across fork. `GroupGuard` covers the whole process
group of such a child (start it with start_new_session=True).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1          # <linux/prctl.h>

_prctl_fn = None


def _prctl():
    """libc's prctl, looked up in the parent: the preexec function runs between fork and exec,
    where dlopen()/dlsym() (they take locks another thread may have held at fork) must not run."""
    global _prctl_fn
    if _prctl_fn is None and sys.platform.startswith("linux"):
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).prctl     # the process's own libc
        fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        fn.restype = ctypes.c_int
        _prctl_fn = fn
    return _prctl_fn


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None]:
    """A preexec_fn: the child gets `sig` when the harness dies.

    Call it in the parent (it records the parent's PID then) from the thread that will own the
    child, and pass the result as preexec_fn. PR_SET_PDEATHSIG fires when the parent *thread*
    that forked the child exits, not when the whole process does: a child spawned from a
    short-lived worker thread would be signalled when that thread ends. Every spawn site in the
    harness runs on a thread that lives as long as the child is needed (the main thread, or a
    test's thread that also stops the child).

    The parent may die between fork and prctl(): then no death signal would ever come, so after
    setting it the child checks that its parent is still the process that forked it (a dead
    parent's children are re-parented to init or a subreaper) and signals itself if not.
    Elsewhere than Linux it does nothing.
    """
    parent = os.getpid()
    prctl = _prctl()

    def preexec() -> None:
        if prctl is None:
            return
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


# The guard: a separate small process that reads a pipe whose only writer is the harness. The
# harness writing b"x" then closing it means "the group is finished with, exit". End of file
# without it means the harness died (the kernel closes a dead process's files): then the guard
# sends SIGTERM to the group (make deletes its half-written targets and stops its children), and
# SIGKILL to whatever is left after a grace period.
_GUARD = r"""
import os, signal, sys, time
pgid, grace = int(sys.argv[1]), float(sys.argv[2])
signal.signal(signal.SIGINT, signal.SIG_IGN)
data = b""
while True:
    chunk = os.read(0, 64)
    if not chunk:
        break
    data += chunk
if b"x" not in data:
    def alive():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        sys.exit(0)
    end = time.monotonic() + grace
    while alive() and time.monotonic() < end:
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


class GroupGuard:
    """Kills the process group `pgid` if the harness dies while it is in use (SIGKILL included).

    For a child started with start_new_session=True (its PID is its group's ID) whose own
    children must not outlive the harness either: `make` and its compilers. Use as a context
    manager around the child's life; leaving it normally (exception or not) dismisses the guard
    without touching the group, which the caller stops itself.
    """

    def __init__(self, pgid: int, grace: float = 3.0) -> None:
        read_end, self._write_end = os.pipe()      # both close-on-exec: no other child inherits them
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _GUARD, str(pgid), str(grace)],
                                         stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         close_fds=True, start_new_session=True)
        except BaseException:
            os.close(self._write_end)
            raise
        finally:
            os.close(read_end)

    def dismiss(self) -> None:
        if self._write_end < 0:
            return
        try:
            os.write(self._write_end, b"x")
        finally:
            os.close(self._write_end)
            self._write_end = -1
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> GroupGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dismiss()


def _kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM to the child's group, SIGKILL after `grace` seconds; then reap the child."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_group(argv: list[str], *, timeout: float | None = None, **popen_kw) -> int:
    """Run `argv` to its end in a process group of its own and return its exit status.

    The whole group is stopped if the harness is killed (SIGKILL included: GroupGuard), on an
    interrupt or other exception, and at `timeout` (then subprocess.TimeoutExpired is raised).
    """
    proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM), **popen_kw)
    with GroupGuard(proc.pid):
        try:
            return proc.wait(timeout)
        except BaseException:
            _kill_group(proc)
            raise
