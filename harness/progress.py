"""Progress for long steps: a live status line on a terminal, plain timestamped lines in CI."""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import TextIO


class Progress:
    """Reports a long step. `update()` may be called often; output is rate-limited."""

    def __init__(self, title: str, *, stream: TextIO = sys.stderr, quiet: bool = False,
                 plain_interval: float = 30.0) -> None:
        self.title = title
        self.stream = stream
        self.quiet = quiet
        self.live = stream.isatty() and not os.environ.get("CI")
        self.plain_interval = plain_interval
        self.start = time.monotonic()
        self._last = 0.0
        self.steps = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def update(self, detail: str = "") -> None:
        self.steps += 1
        if self.quiet:
            return
        now = time.monotonic()
        if self.live:
            if now - self._last < 0.1:
                return
            width = shutil.get_terminal_size((100, 24)).columns - 1
            line = f"[{self.title} {self.elapsed():5.0f}s, {self.steps} steps] {detail}"
            self.stream.write("\r\x1b[K" + line[:width])
            self.stream.flush()
        elif now - self._last >= self.plain_interval:
            self.stream.write(f"{self.title}: {self.elapsed():.0f}s, {self.steps} steps, {detail}\n")
            self.stream.flush()
        else:
            return
        self._last = now

    def done(self, summary: str) -> None:
        if self.quiet:
            return
        if self.live:
            self.stream.write("\r\x1b[K")
        self.stream.write(f"{self.title}: {summary} ({self.elapsed():.1f}s)\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        if not self.quiet:
            if self.live:
                self.stream.write("\r\x1b[K")
            self.stream.write(f"{self.title}: {message}\n")
            self.stream.flush()

