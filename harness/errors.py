"""Exit codes and the exception types that carry them.

Every failure names the stage it happened in, so a CI log or a bisect script can tell a broken
kernel from a broken machine without reading prose.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """The harness's codes. 0 and 1 mean what they mean to pytest; the harness's own kinds of
    failure are 10-13, clear of pytest's 0-5, so a suite session that ends on one (the target
    panicked, hung, or could not be built) says which, and a bisect can tell a hang (a
    regression) from a broken machine (skip). A usage error is 2 from the CLI (as argparse) and
    pytest's own 4 from a pytest session."""

    PASS = 0
    TEST_FAILURE = 1    # the kernel ran, but a check failed (pKVM not up, WARN, wrong mode)
    USAGE = 2           # bad input: options, paths, fragments, missing tools (argparse uses 2 too)
    PANIC = 10          # kernel panic, oops, or an EL2 (hyp) panic/BUG
    TIMEOUT = 11        # a deadline passed (boot, command)
    INFRA = 12          # the harness or the host failed (QEMU vanished, I/O errors, apt)
    BUILD_FAILURE = 13  # the kernel did not compile or link
    INTERRUPTED = 130   # Ctrl-C or SIGTERM


# pytest's own exit code for a usage error: what a bad --pkvm-* option ends a pytest session with.
PYTEST_USAGE = 4


def session_exit_code(code: ExitCode) -> int:
    """The code a pytest session ends with when the harness stops it."""
    return PYTEST_USAGE if code == ExitCode.USAGE else int(code)


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

    def __init__(self, message: str, *, log: Path | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.log = log
