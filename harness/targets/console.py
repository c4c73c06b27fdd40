"""A serial console driven with pexpect: everything read is kept in memory and in the log."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import pexpect

from harness.targets import framing
from harness.targets.base import CommandResult, CommandTimeout, TargetDead
from harness.targets.sockchild import SocketChild


class _Tee:
    """pexpect's logfile_read: append to the console log and to an in-memory buffer."""

    def __init__(self, log: BinaryIO) -> None:
        self.log = log
        self.buffer = bytearray()

    def write(self, data: bytes) -> None:
        self.buffer += data
        self.log.write(data)

    def flush(self) -> None:
        self.log.flush()


class Console:
    def __init__(self, child: pexpect.spawn | SocketChild, log_path: Path) -> None:
        self.child = child
        self._log = open(log_path, "wb")
        self._tee = _Tee(self._log)
        child.logfile_read = self._tee

    def expect(self, patterns: Sequence[re.Pattern[bytes] | type[pexpect.EOF] | type[pexpect.TIMEOUT]],
               deadline: float) -> int:
        """Index of the first pattern seen; pexpect.EOF and pexpect.TIMEOUT may be in the list.

        `deadline` is absolute (time.monotonic()); it is never exceeded.
        """
        timeout = max(0.0, deadline - time.monotonic())
        return self.child.expect(list(patterns), timeout=timeout)

    def sendline(self, line: str) -> None:
        self.child.sendline(line.encode())

    def text(self, upto: int | None = None) -> str:
        """Everything read so far, or its first `upto` bytes (see mark())."""
        return bytes(self._tee.buffer[:upto]).decode(errors="replace")

    def mark(self) -> int:
        """How many bytes have been read so far: text(upto=mark) is the console as it was then."""
        return len(self._tee.buffer)

    def drain(self, seconds: float) -> None:
        """Read whatever arrives for up to `seconds` or until EOF (to finish a panic trace)."""
        if self._pump is not None:
            self._pump.join(seconds)        # the pump is reading: wait for it to see EOF
            return
        try:
            self.child.expect(pexpect.EOF, timeout=seconds)
        except pexpect.TIMEOUT:
            pass

    _pump: threading.Thread | None = None

    def start_pump(self) -> None:
        """Keep reading the console in the background. For the SSH transport, where nothing
        else reads it: a full pty would stall the guest's serial output, printk with it."""
        stop = self._pump_stop = threading.Event()

        def pump() -> None:
            while not stop.is_set():
                try:
                    self.child.read_nonblocking(65536, timeout=0.2)
                except pexpect.TIMEOUT:
                    continue
                except (pexpect.EOF, OSError, ValueError):
                    return

        self._pump = threading.Thread(target=pump, name="console-pump", daemon=True)
        self._pump.start()

    def stop_pump(self) -> None:
        if self._pump is not None:
            self._pump_stop.set()
            self._pump.join(2)
            self._pump = None

    def close(self) -> None:
        if not self._log.closed:
            self._tee.flush()
            self._log.close()


# busybox ash edits at most 1024 characters per input line; the frame adds about 200.
MAX_LINE = 768


class ConsoleShell:
    """Commands over the console's shell, framed by per-command markers (harness.targets.framing).

    A command that passes its deadline gets Ctrl-C; if the shell then answers a probe, the
    target is usable again, otherwise it is marked dead. Either way the caller gets
    CommandTimeout, never a hang.
    """

    PROBE_SECONDS = 5.0

    def __init__(self, console: Console) -> None:
        self.console = console
        self.dead = False
        self.kernel_lines: list[str] = []   # kernel messages seen inside command output

    def run(self, cmd: str, timeout: float = 60.0) -> CommandResult:
        if self.dead:
            raise TargetDead("the console shell is dead (an earlier command hung and Ctrl-C did not help)")
        too_long = [line for line in cmd.splitlines() if len(line) > MAX_LINE]
        if too_long:
            raise ValueError(f"a console command line is limited to {MAX_LINE} characters (busybox's line "
                             f"editor truncates longer ones); got {len(too_long[0])}: use put() for data")
        frame = framing.Frame.new()
        start = time.monotonic()
        deadline = start + timeout
        try:
            self.console.sendline(frame.wrap(cmd))
        except OSError as e:             # QEMU is gone (a panic with -no-reboot powers it off)
            self.dead = True
            raise TargetDead(f"the console is closed: {e}", command_started=False) from None
        try:
            if self.console.expect([frame.begin(), pexpect.EOF, pexpect.TIMEOUT], deadline) != 0:
                raise _Stuck
            if self.console.expect([frame.end(), pexpect.EOF, pexpect.TIMEOUT], deadline) != 0:
                raise _Stuck
        except _Stuck:
            partial = self.console.child.before or b""
            alive = self._recover()
            raise CommandTimeout(cmd, timeout, alive, framing.clean(partial).decode(errors="replace")) from None
        parsed = framing.parse(self.console.child.before or b"", frame)
        self.kernel_lines += parsed.kernel_lines
        return CommandResult(cmd, parsed.status, parsed.stdout, parsed.stderr, time.monotonic() - start)

    def _recover(self) -> bool:
        """Ctrl-C, then a probe command: True if the shell answers."""
        if not self.console.child.isalive():
            self.dead = True
            return False
        probe = framing.Frame.new()
        deadline = time.monotonic() + self.PROBE_SECONDS
        try:
            self.console.child.sendcontrol("c")
            self.console.sendline(probe.wrap("true"))
            ok = self.console.expect([probe.end(), pexpect.EOF, pexpect.TIMEOUT], deadline) == 0
        except OSError:
            ok = False
        self.dead = not ok
        return ok


class _Stuck(Exception):
    pass
