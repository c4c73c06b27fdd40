"""The one start-and-judge sequence of a QEMU pKVM host: start QEMU, read the console to the
spec's ready marker (or a crash, QEMU's exit, the deadline), and judge what it printed.

`QemuTarget` boots through `start()`; `pkvm-harness run`, the suites and the bisect runner all
boot through `QemuTarget`, so a boot is judged the same way everywhere.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import pexpect

from harness import verdict
from harness.errors import ExitCode, UsageError
from harness.targets.base import TargetError
from harness.targets.console import Console
from harness.targets.qemu import QemuMachine

# Kernel output that proves QEMU got as far as running the kernel.
_KERNEL_STARTED = "Booting Linux on physical CPU"
# After a panic line, keep reading this long for the rest of the trace (QEMU exits by itself).
PANIC_GRACE = 5.0


class QemuStartError(UsageError):
    """QEMU exited before the kernel printed anything: almost always a bad option."""
    stage = "boot"


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


class BootFailed(TargetError):
    """The target did not reach its shell; carries the verdict, its exit code and the timings."""

    stage = "boot"

    def __init__(self, v: verdict.BootVerdict, state: ReadyState, qemu_exit: int | None) -> None:
        super().__init__(f"the pKVM host did not come up: {v.reason}")
        self.verdict = v
        self.state = state
        self.qemu_exit = qemu_exit
        self.exit_code = v.exit_code if v.exit_code != ExitCode.PASS else ExitCode.TEST_FAILURE


def _compile(rx: str) -> re.Pattern[bytes]:
    return re.compile(rx.encode())


def panic_regex() -> str:
    """One regex matching any console line that means the machine crashed."""
    return "|".join(p.regex.pattern for p in verdict.PATTERNS if p.outcome is verdict.Outcome.PANIC)


def wait_ready(machine: QemuMachine, console: Console, deadline: float) -> ReadyState:
    """Read the console until the spec's ready marker, a crash, QEMU's exit or `deadline`."""
    patterns: list[re.Pattern[bytes] | type[pexpect.EOF] | type[pexpect.TIMEOUT]] = [
        _compile(verdict.PKVM_UP_RE.pattern), _compile(re.escape(machine.spec.ready_marker) + r" "),
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
            console.drain(PANIC_GRACE)
        elif idx == 4:
            state.timed_out = True
            state.judged_upto = console.mark()
        return state


def crashed(console: Console) -> bool:
    return bool(verdict.panics(console.text()))


def check_started(text: str, machine: QemuMachine, timed_out: bool) -> None:
    """Raise QemuStartError if QEMU died before the kernel printed anything."""
    if _KERNEL_STARTED not in text and not timed_out:
        qemu_says = [line.strip() for line in text.splitlines() if line.strip()]
        detail = qemu_says[-1] if qemu_says else "no output"
        raise QemuStartError(f"QEMU exited at start (status {machine.exit_status}): {detail[:300]}",
                             hint="check --cpu, --smp, --mem and --qemu-arg; the command is in qemu-cmd.sh")


def start(machine: QemuMachine, timeout: float, expect_mode: str | None = None) -> tuple[Console, ReadyState]:
    """Start `machine` and wait for its shell. On failure QEMU is stopped and BootFailed (or
    QemuStartError, for a QEMU that never ran the kernel) says why."""
    console = machine.start()
    state = wait_ready(machine, console, machine.started_at + timeout)
    if state.ready and not crashed(console):
        return console, state
    machine.stop()
    text = console.text(upto=state.judged_upto)
    check_started(text, machine, state.timed_out)
    raise BootFailed(judge(machine, text, state.timed_out, expect_mode), state, machine.exit_status)


def judge(machine: QemuMachine, text: str, timed_out: bool = False,
          expect_mode: str | None = None) -> verdict.BootVerdict:
    return verdict.judge(text, ready_marker=machine.spec.ready_marker, timed_out=timed_out, expect_mode=expect_mode)
