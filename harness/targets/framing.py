"""Framing of shell commands over a serial console.

The console carries the shell's echo, terminal escape codes and kernel messages that may arrive
at any moment, even in the middle of a line of output. Each command is therefore wrapped:

  - per-command random markers around it (begin, status, end), printed with an empty ''
    inside the typed text so the shell's echo of the command never matches them;
  - every line the command writes to stdout or stderr gets a one-byte prefix (RS, 0x1e) in the
    guest, so an unprefixed line is never output: it is a kernel message (or shell noise).

A kernel message that lands in the middle of an output line splits it; it is recognised by its
printk timestamp (CONFIG_PRINTK_TIME) and the line is joined again. Pure functions, tested on
transcripts.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

PREFIX = b"\x1e"
TIMESTAMP_RE = re.compile(rb"\[ *\d+\.\d{6}\] ")
ESCAPE_RE = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\x1b[=>]")


@dataclass(frozen=True)
class Frame:
    marker: str

    @classmethod
    def new(cls) -> Frame:
        return cls("PKH" + secrets.token_hex(6))

    def wrap(self, cmd: str) -> str:
        m = self.marker
        tmp = f"/tmp/.{m}"
        prefix = "sed \"s/^/$(printf '\\036')/\""      # busybox sed has no \\x escapes
        # A subshell, so `exit` or `cd` in the command cannot end or move the console's shell;
        # no stdin, so a command that reads input gets EOF instead of the harness's keystrokes.
        return (f"echo {m}''-B; {{ ( {cmd}\n) </dev/null 2>{tmp}.err; echo $? >{tmp}.rc; }} | {prefix}; "
                f"echo; echo {m}''-S:$(cat {tmp}.rc); {prefix} {tmp}.err; echo; rm -f {tmp}.err {tmp}.rc; "
                f"echo {m}''-E")

    def begin(self) -> re.Pattern[bytes]:
        return re.compile(rf"{self.marker}-B\r*\n".encode())

    def end(self) -> re.Pattern[bytes]:
        return re.compile(rf"{self.marker}-E\r*\n".encode())

    def status(self) -> re.Pattern[bytes]:
        return re.compile(rf"^{self.marker}-S:(\d+)\n".encode(), re.MULTILINE)


@dataclass(frozen=True)
class Parsed:
    stdout: str
    stderr: str
    status: int
    kernel_lines: list[str]


def clean(raw: bytes) -> bytes:
    """Drop terminal escape codes and carriage returns."""
    return ESCAPE_RE.sub(b"", raw).replace(b"\r", b"")


def _section(data: bytes, kernel: list[str]) -> str:
    """Undo the prefixing of one stream; kernel lines go to `kernel`.

    The shell adds one newline after the stream, so a stream that ended with a newline leaves an
    empty unprefixed line behind its last prefixed line.
    """
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out: list[bytes] = []
    ended_with_newline = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(PREFIX):
            content = line[1:]
            # the last timestamp inside the line (one at its very start is output, e.g. dmesg's)
            ts = next(reversed([t for t in TIMESTAMP_RE.finditer(content) if t.start() > 0]), None)
            nxt = lines[i + 1] if i + 1 < len(lines) else None
            if ts and nxt and not nxt.startswith(PREFIX) and not TIMESTAMP_RE.match(nxt):
                kernel.append(content[ts.start():].decode(errors="replace"))   # split by a kernel line
                content = content[:ts.start()] + nxt
                i += 1
            out.append(content)
            ended_with_newline = False
        elif line == b"":
            ended_with_newline = bool(out)
        else:
            kernel.append(line.decode(errors="replace"))
        i += 1
    text = b"\n".join(out) + (b"\n" if ended_with_newline else b"")
    return text.decode(errors="replace")


def parse(body: bytes, frame: Frame) -> Parsed:
    """`body`: what the console printed between the begin and the end marker lines."""
    data = clean(body)
    m = frame.status().search(data)
    if m is None:
        raise ValueError(f"no status marker for {frame.marker} in console output")
    kernel: list[str] = []
    stdout = _section(data[: m.start()], kernel)
    stderr = _section(data[m.end():], kernel)
    return Parsed(stdout, stderr, int(m.group(1)), kernel)


_ECHO_RE = re.compile(r"echo (PKH[0-9a-f]{12})''-B")
_MARK_RE = re.compile(r"^(PKH[0-9a-f]{12})-(B|E|S:(\d+))$")


def readable(transcript: str, commands: list[str]) -> list[str]:
    """A framed console transcript as a person reads it: each framed command's echo becomes
    `$ command` (the i-th echo is commands[i]), a non-zero status becomes `[exit N]`, markers and
    output prefixes go. Kernel lines and output stay where they were."""
    out: list[str] = []
    echoing: str | None = None
    ran = iter(commands)
    for line in clean(transcript.encode(errors="replace")).decode(errors="replace").split("\n"):
        echo = _ECHO_RE.search(line)
        if echo and echoing is None:
            echoing = echo.group(1)
            out.append(f"$ {next(ran, '(a command)')}")
            continue
        mark = _MARK_RE.match(line.strip())
        if mark:
            if mark.group(1) == echoing and mark.group(2) == "B":
                echoing = None
            elif mark.group(3) and mark.group(3) != "0":
                out.append(f"[exit {mark.group(3)}]")
            continue
        if echoing is None and line.strip():
            out.append(line.removeprefix(PREFIX.decode()))
    return out
