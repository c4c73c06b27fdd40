"""SocketChild: a child process on a socket pair behaves as pexpect's pty spawn does where the
harness relies on it (echo, EOF at exit, exit status and signal, Ctrl-C as a byte, a reset peer)."""

from __future__ import annotations

import os
import signal

import pexpect

from harness.targets.sockchild import SocketChild


def test_round_trip_exit_status_and_eof():
    child = SocketChild(["sh", "-c", "read line; echo got:$line; exit 3"], dict(os.environ))
    child.sendline(b"hello")
    assert child.expect([rb"got:hello", pexpect.EOF], timeout=10) == 0
    assert child.expect(pexpect.EOF, timeout=10) == 0
    child.close()
    assert not child.isalive() and (child.exitstatus, child.signalstatus) == (3, None)


def test_control_characters_are_bytes_on_the_wire():
    child = SocketChild(["od", "-An", "-tx1"], dict(os.environ))
    child.sendcontrol("c")
    child.sendcontrol("]")
    child._sock.shutdown(1)                    # EOF on od's stdin
    child.expect(pexpect.EOF, timeout=10)
    assert child.before.split() == [b"03", b"1d"]
    child.close()


def test_terminate_and_a_peer_that_exits_with_input_unread():
    child = SocketChild(["sh", "-c", "echo ready; exec sleep 60"], dict(os.environ))
    child.expect(b"ready", timeout=10)
    child.send(b"x" * 4096)                    # never read by sleep: its exit resets the socket
    assert child.terminate(force=True)
    assert child.expect(pexpect.EOF, timeout=10) == 0        # a reset reads as EOF, as on a pty
    child.close()
    assert child.signalstatus == signal.SIGTERM and child.pid > 0
