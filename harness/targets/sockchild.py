"""QEMU's console on a socket pair instead of a pty.

QEMU writes the guest's serial output to its stdio chardev a byte at a time; on a pty each of
those writes goes through the tty layer. On a socket pair the guest boots to its shell in the
time a bare `qemu-system-aarch64` on a pipe takes (1.23 s against 1.51 s on a pty, measured; see
docs/benchmarks.md). pexpect's fdspawn drives the socket; this class adds what fdspawn lacks for a
child process (liveness, exit status, signals). `boot --interactive` keeps the pty: a person's
terminal needs one.
"""

from __future__ import annotations

import signal
import socket
import subprocess

import pexpect
from pexpect import fdpexpect

from harness.procs import die_with_parent


class SocketChild(fdpexpect.fdspawn):
    """A child process whose stdin, stdout and stderr are one end of a socket pair."""

    def __init__(self, argv: list[str], env: dict[str, str], maxread: int = 1 << 16) -> None:
        ours, theirs = socket.socketpair()
        try:
            # A new session, as pexpect's pty spawn gives: a Ctrl-C in the user's terminal reaches
            # the harness, which stops QEMU itself. A harness killed outright (SIGKILL) cannot:
            # the kernel kills QEMU then (die_with_parent: PR_SET_PDEATHSIG).
            self.proc = subprocess.Popen(argv, stdin=theirs.fileno(), stdout=theirs.fileno(),
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True, close_fds=True,
                                         preexec_fn=die_with_parent(signal.SIGKILL))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        super().__init__(ours.fileno(), maxread=maxread, encoding=None)
        self.pid = self.proc.pid
        self.exitstatus: int | None = None
        self.signalstatus: int | None = None

    def read_nonblocking(self, size: int = 1, timeout: float | None = -1) -> bytes:
        # A socket whose peer exited with our input unread reports a reset where a pty reports
        # EOF; everything QEMU wrote before it has been read by then.
        try:
            return super().read_nonblocking(size, timeout)
        except ConnectionResetError:
            self.flag_eof = True
            raise pexpect.EOF("QEMU closed its console") from None

    def isalive(self) -> bool:
        if self.proc.poll() is None:
            return True
        self._record_exit()
        return False

    def _record_exit(self) -> None:
        code = self.proc.returncode
        if code is not None:
            self.exitstatus, self.signalstatus = (code, None) if code >= 0 else (None, -code)

    def sendcontrol(self, char: str) -> int:
        return self.send(bytes([ord(char.lower()) & 0x1F]))

    def terminate(self, force: bool = False) -> bool:  # type: ignore[override]  # as pexpect.spawn's, not fdspawn's
        """SIGTERM, then SIGKILL after a second if `force`; True when the process is gone."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(1.0)
            except subprocess.TimeoutExpired:
                if force:
                    self.proc.kill()
                    try:
                        self.proc.wait(5.0)
                    except subprocess.TimeoutExpired:
                        pass
        return not self.isalive()

    def close(self, force: bool = True) -> None:
        if self.proc.poll() is None and force:
            self.terminate(force=True)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._record_exit()
        if self.child_fd != -1:
            super().close()
            self._sock.detach()          # the fd is closed; the socket object must not close it again
