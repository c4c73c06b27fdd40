"""Exit codes and the exception types that carry them.

Every failure names the stage it happened in, so a CI log or a bisect script can tell a broken
kernel from a broken machine without reading prose.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    PASS = 0
    TEST_FAILURE = 1   # the kernel ran, but a check failed (pKVM not up, WARN, wrong mode)
    USAGE = 2          # bad input: options, paths, fragments, missing tools (argparse uses 2 too)
    PANIC = 3          # kernel panic, oops, or an EL2 (hyp) panic/BUG
    TIMEOUT = 4        # a deadline passed (boot, command)
    INFRA = 5          # the harness or the host failed (QEMU vanished, I/O errors, apt)
    BUILD_FAILURE = 6  # the kernel did not compile or link
    INTERRUPTED = 130  # Ctrl-C


class HarnessError(Exception):
    """An error with a one-line message that says what is wrong and what to do."""

    exit_code: ExitCode = ExitCode.INFRA
    stage: str = "infrastructure"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class UsageError(HarnessError):
    exit_code = ExitCode.USAGE
    stage = "usage"


class ConfigError(UsageError):
    stage = "config"


class InfraError(HarnessError):
    exit_code = ExitCode.INFRA
    stage = "infrastructure"


class BuildError(HarnessError):
    exit_code = ExitCode.BUILD_FAILURE
    stage = "build"

    def __init__(self, message: str, *, log: Path, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.log = log
