"""Framing of shell commands over a serial console.

Each command is wrapped in per-command random markers, so its stdout, stderr and exit status can
be cut out of a console stream that also carries the shell's echo, terminal escape codes and
kernel messages printed at any moment (even mid-line). Pure functions: tested on transcripts.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

# printk lines carry a timestamp (CONFIG_PRINTK_TIME); the console prints them whole, possibly
# in the middle of a line of command output.
KERNEL_LINE_RE = re.compile(rb"\[ *\d+\.\d{6}\] [^\n]*\n")
ESCAPE_RE = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\x1b[=>]")


@dataclass(frozen=True)
class Frame:
    marker: str

    @classmethod
    def new(cls) -> "Frame":
        return cls("PKH" + secrets.token_hex(6))

    # The shell line. The markers are printed with an empty '' inside the typed text, so the
    # shell's echo of this line never matches the markers themselves.
    def wrap(self, cmd: str) -> str:
        m = self.marker
        err = f"/tmp/.{m}.err"
        # A subshell, so `exit` or `cd` in the command cannot end or move the console's shell.
        return (f"echo {m}''-B; ( {cmd}\n) </dev/null 2>{err}; __pkh=$?; echo; echo {m}''-S:$__pkh; "
                f"cat {err}; rm -f {err}; echo; echo {m}''-E")

    def begin(self) -> re.Pattern[bytes]:
        return re.compile(rf"{self.marker}-B\r*\n".encode())

    def end(self) -> re.Pattern[bytes]:
        return re.compile(rf"{self.marker}-E\r*\n".encode())


@dataclass(frozen=True)
class Parsed:
    stdout: str
    stderr: str
    status: int
    kernel_lines: list[str]


def clean(raw: bytes) -> tuple[bytes, list[str]]:
    """Drop escape codes and carriage returns; lift out kernel lines (returned separately)."""
    data = ESCAPE_RE.sub(b"", raw).replace(b"\r", b"")
    kernel = [m.group(0).decode(errors="replace").rstrip("\n") for m in KERNEL_LINE_RE.finditer(data)]
    return KERNEL_LINE_RE.sub(b"", data), kernel


def parse(body: bytes, frame: Frame) -> Parsed:
    """`body` is what the console printed between the begin and the end marker lines.

    Layout: stdout, "\\n", "<m>-S:<status>\\n", stderr, "\\n". The extra newlines make the
    markers land on their own line even when the output does not end with one; they are removed.
    """
    data, kernel = clean(body)
    status_re = re.compile(rf"^{frame.marker}-S:(\d+)\n".encode(), re.MULTILINE)
    m = None
    for m in status_re.finditer(data):
        pass
    if m is None:
        raise ValueError(f"no status marker for {frame.marker} in console output")
    stdout = data[: m.start()]
    stderr = data[m.end():]
    stdout = stdout[:-1] if stdout.endswith(b"\n") else stdout   # the echo we added
    stderr = stderr[:-1] if stderr.endswith(b"\n") else stderr
    return Parsed(stdout.decode(errors="replace"), stderr.decode(errors="replace"), int(m.group(1)), kernel)
