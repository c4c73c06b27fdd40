"""Boot a pKVM host under QEMU and judge it: the boot stage of every run."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import pexpect

from harness import verdict
from harness.errors import UsageError
from harness.targets.qemu import QemuMachine, QemuSpec

# Kernel output that proves QEMU got as far as running the kernel.
_KERNEL_STARTED = "Booting Linux on physical CPU"
# After a panic line, keep reading this long for the rest of the trace (QEMU exits by itself).
_PANIC_GRACE = 5.0
_POWEROFF_DEADLINE = 15.0


@dataclass
class BootResult:
    verdict: verdict.BootVerdict
    seconds_to_pkvm: float | None
    seconds_to_ready: float | None
    seconds_total: float
    qemu_exit: int | None
    console_log: Path


class QemuStartError(UsageError):
    """QEMU exited before the kernel printed anything: almost always a bad option."""
    stage = "boot"


def _compile(rx: str) -> re.Pattern[bytes]:
    return re.compile(rx.encode())


def panic_regex() -> str:
    """One regex matching any console line that means the machine crashed."""
    return "|".join(p.regex.pattern for p in verdict.PATTERNS if p.outcome is verdict.Outcome.PANIC)


@dataclass
class ReadyState:
    seconds_to_pkvm: float | None = None
    seconds_to_ready: float | None = None
    timed_out: bool = False
    crashed: bool = False
    # Bytes of console read at the deadline, when it passed: a verdict judges the console as it
    # was then (on the socket console QEMU keeps booting into the buffer after it; a pty blocked).
    judged_upto: int | None = None

    @property
    def ready(self) -> bool:
        return self.seconds_to_ready is not None


def wait_ready(machine: QemuMachine, console, deadline: float, ready_marker: str) -> ReadyState:
    """Read the console until the init script's ready marker, a crash, QEMU's exit or `deadline`."""
    patterns = [_compile(verdict.PKVM_UP_RE.pattern), _compile(re.escape(ready_marker) + r" "),
                _compile(panic_regex()), pexpect.EOF, pexpect.TIMEOUT]
    state = ReadyState()
    while True:
        idx = console.expect(patterns, deadline)
        now = time.monotonic() - machine.started_at
        if idx == 0:
            state.seconds_to_pkvm = state.seconds_to_pkvm or now
            continue
        if idx == 1:
            state.seconds_to_ready = now
        elif idx == 2:
            state.crashed = True
            console.drain(_PANIC_GRACE)
        elif idx == 4:
            state.timed_out = True
            state.judged_upto = console.mark()
        return state


def crashed(console) -> bool:
    return bool(verdict.panics(console.text()))


def check_started(text: str, machine: QemuMachine, timed_out: bool) -> None:
    """Raise QemuStartError if QEMU died before the kernel printed anything."""
    if _KERNEL_STARTED not in text and not timed_out:
        qemu_says = [line.strip() for line in text.splitlines() if line.strip()]
        detail = qemu_says[-1] if qemu_says else "no output"
        raise QemuStartError(f"QEMU exited at start (status {machine.exit_status}): {detail[:300]}",
                             hint="check --cpu, --smp, --mem and --qemu-arg; the command is in qemu-cmd.sh")


def boot(spec: QemuSpec, console_log: Path, *, timeout: float, ready_marker: str,
         expect_mode: str | None = None, keep_running=None) -> BootResult:
    """Boot, wait for the ready marker (or a failure), power off, and judge the console.

    `keep_running(machine, console)` is called once the shell is ready, before power-off: later
    stages (suites) hook in there. Whatever happens, QEMU is stopped before this returns.
    """
    with QemuMachine(spec, console_log) as machine:
        console = machine.start()
        t0 = machine.started_at
        state = wait_ready(machine, console, t0 + timeout, ready_marker)
        if state.ready:
            if keep_running:
                keep_running(machine, console)
            # A machine that panicked may hang rather than exit: do not wait on a power-off then.
            if not crashed(console):
                console.sendline("poweroff -f")
                machine.wait_exit(_POWEROFF_DEADLINE)
        machine.stop()
        text = console.text(upto=state.judged_upto)
    total = time.monotonic() - t0
    check_started(text, machine, state.timed_out)
    v = verdict.judge(text, ready_marker=ready_marker, timed_out=state.timed_out, expect_mode=expect_mode)
    return BootResult(v, state.seconds_to_pkvm, state.seconds_to_ready, total, machine.exit_status, console_log)
