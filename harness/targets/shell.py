"""Target operations built from plain shell commands, shared by every transport."""

from __future__ import annotations

import re

from harness.targets.base import CommandResult, DmesgMark, TargetError
from harness.verdict import PKVM_UP_RE


class ShellHelpers:
    """Mixed into targets that have `run()`: dmesg marks and pKVM detection."""

    name: str

    def run(self, cmd: str, timeout: float = 60.0) -> CommandResult:
        raise NotImplementedError

    @property
    def commands(self) -> list[str]:
        """Every command run so far, in order: a failing test's report shows what it ran."""
        if "_commands" not in self.__dict__:
            self._commands: list[str] = []
        return self._commands

    def dmesg_mark(self) -> DmesgMark:
        return DmesgMark(int(self.run("dmesg | wc -l").check().stdout.strip()))

    def dmesg(self, since: DmesgMark | None = None) -> str:
        """The kernel log, or only what came after `since` (by line count: a ring buffer that
        wrapped in between loses the oldest lines, as dmesg itself would)."""
        if since is None:
            return self.run("dmesg", timeout=60).check().stdout.rstrip("\n")
        # only the new lines cross the console (the EL2 suites read this after every test)
        return self.run(f"dmesg | tail -n +{since.lines + 1}", timeout=60).check().stdout.rstrip("\n")

    def pkvm_mode(self) -> str | None:
        """"nVHE"/"hVHE" when the kernel says protected mode is up, else None."""
        m = PKVM_UP_RE.search(self.dmesg())
        return m.group(1) if m else None

    def require_pkvm(self) -> str:
        """Refuse a machine that does not run pKVM, saying why; returns the mode."""
        cmdline = self.run("cat /proc/cmdline").check().stdout.strip()
        modes = re.findall(r"(?:^|\s)kvm-arm\.mode=(\S+)", cmdline)
        if not modes or modes[-1] != "protected":       # the last one given wins
            given = f"kvm-arm.mode={modes[-1]}" if modes else "no kvm-arm.mode="
            raise TargetError(f"{self.name} does not run pKVM: its kernel command line has {given}",
                              hint="boot the board with kvm-arm.mode=protected")
        mode = self.pkvm_mode()
        if mode is None:
            raise TargetError(f"{self.name} was booted with kvm-arm.mode=protected but dmesg has no "
                              "'Protected nVHE/hVHE mode initialized successfully'",
                              hint="check dmesg for why KVM failed to initialize")
        return mode
