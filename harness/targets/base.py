"""The Target protocol: what a test suite may ask of any machine under test (QEMU or a board)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from harness.errors import ExitCode, HarnessError


@dataclass(frozen=True)
class CommandResult:
    command: str
    status: int
    stdout: str
    stderr: str          # "" where the transport cannot separate it (never on ssh/console here)
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == 0

    def check(self) -> CommandResult:
        """Raise unless the command exited 0; the message carries its output."""
        if self.status != 0:
            raise CommandFailed(self)
        return self


class TargetError(HarnessError):
    exit_code = ExitCode.INFRA
    stage = "target"


class CommandFailed(TargetError):
    exit_code = ExitCode.TEST_FAILURE

    def __init__(self, result: CommandResult) -> None:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        super().__init__(f"`{result.command}` exited {result.status}: {' | '.join(tail)}")
        self.result = result


class CommandTimeout(TargetError):
    """A command passed its deadline. `target_alive` says whether the target is usable again."""

    exit_code = ExitCode.TIMEOUT
    stage = "workload"

    def __init__(self, command: str, timeout: float, target_alive: bool, output: str = "") -> None:
        state = "the target still answers" if target_alive else "the target is dead"
        super().__init__(f"`{command}` did not finish within {timeout:g}s; {state}")
        self.target_alive = target_alive
        self.output = output


class TargetDead(TargetError):
    """The target stopped answering. `command_started` is False when the connection was found
    lost before the command began, so running it again cannot run it twice."""

    def __init__(self, message: str, *, command_started: bool = True, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.command_started = command_started


class TargetPanicked(TargetDead):
    """The target died because its kernel (or EL2) panicked: the console's first panic line says where."""

    exit_code = ExitCode.PANIC

    def __init__(self, command: str, panic_line: str) -> None:
        super().__init__(f"the target panicked during `{command}`: {panic_line}",
                         hint="the console log in the run directory has the whole trace")
        self.panic_line = panic_line


@dataclass(frozen=True)
class DmesgMark:
    lines: int     # dmesg lines that existed when the mark was taken


@dataclass(frozen=True)
class TargetInfo:
    """What result.json says about a target (the `target` object of its schema)."""

    kind: str                      # "qemu" or "ssh"
    name: str
    pkvm_mode: str | None = None
    cpu: str | None = None         # QEMU only, as are smp, mem and transport
    smp: int | None = None
    mem: str | None = None
    transport: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v is not None or k == "pkvm_mode"}


# --- capabilities: what a test or a report may ask of a target; each target has some of them ---

@runtime_checkable
class Shell(Protocol):
    """Commands on the target, and the record of those run (a failing test's report lists them)."""

    name: str

    @property
    def commands(self) -> list[str]: ...

    def run(self, cmd: str, timeout: float = 60.0) -> CommandResult: ...

    def dmesg_mark(self) -> DmesgMark: ...

    def dmesg(self, since: DmesgMark | None = None) -> str: ...


@runtime_checkable
class Files(Protocol):
    def put(self, local: Path, remote: str) -> None: ...

    def get(self, remote: str, local: Path) -> None: ...


@runtime_checkable
class ConsoleLog(Protocol):
    """The serial console since boot (a board over SSH has none: its report shows dmesg)."""

    def console_text(self) -> str: ...


@runtime_checkable
class El2Memory(Protocol):
    """Guest-physical memory (QMP) and the vmlinux to decode EL2's part of it with."""

    @property
    def qmp_socket(self) -> Path: ...

    @property
    def vmlinux(self) -> Path: ...


@runtime_checkable
class Debugger(Protocol):
    """A gdbstub (QEMU's) through which EL2 can be traced with breakpoints."""

    @property
    def gdb_socket(self) -> Path: ...


@runtime_checkable
class Target(Shell, Files, Protocol):
    """Every machine under test: QEMU or a board."""

    def describe(self) -> TargetInfo: ...

    def death(self) -> str | None:
        """Why the target is dead (its first panic line, or how it went away); None while it lives."""

    def reboot(self, timeout: float = 120.0) -> None: ...

    def close(self) -> None: ...
