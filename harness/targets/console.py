"""A serial console driven with pexpect: everything read is kept in memory and in the log."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import BinaryIO

import pexpect


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
    def __init__(self, child: pexpect.spawn, log_path: Path) -> None:
        self.child = child
        self._log = open(log_path, "wb")
        self._tee = _Tee(self._log)
        child.logfile_read = self._tee

    def expect(self, patterns: list[re.Pattern[bytes] | type], deadline: float) -> int:
        """Index of the first pattern seen; pexpect.EOF and pexpect.TIMEOUT may be in the list.

        `deadline` is absolute (time.monotonic()); it is never exceeded.
        """
        timeout = max(0.0, deadline - time.monotonic())
        return self.child.expect(patterns, timeout=timeout)

    def sendline(self, line: str) -> None:
        self.child.sendline(line.encode())

    def text(self) -> str:
        return self._tee.buffer.decode(errors="replace")

    def drain(self, seconds: float) -> None:
        """Read whatever arrives for up to `seconds` or until EOF (to finish a panic trace)."""
        try:
            self.child.expect(pexpect.EOF, timeout=seconds)
        except pexpect.TIMEOUT:
            pass

    def close(self) -> None:
        if not self._log.closed:
            self._tee.flush()
            self._log.close()
