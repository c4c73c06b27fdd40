"""QemuTarget: a booted pKVM host under QEMU, driven over its serial console or over SSH."""

from __future__ import annotations

import base64
import contextlib
import time
from dataclasses import replace
from pathlib import Path

from harness import verdict
from harness.boot import check_started, crashed, wait_ready
from harness.errors import ExitCode
from harness.image.initramfs import READY_MARKER
from harness.image.keys import GuestKeys
from harness.targets.base import CommandResult, CommandTimeout, TargetDead, TargetError, TargetPanicked
from harness.targets.console import ConsoleShell
from harness.targets.qemu import QemuMachine, QemuSpec, free_port
from harness.targets.shell import ShellHelpers
from harness.targets.ssh import SshParams, SshSession

TRANSPORTS = ("console", "ssh")
_CHUNK = 48 * 1024   # bytes per console upload command (base64 lines stay short)


class BootFailed(TargetError):
    """The target did not reach its shell; carries the verdict and its exit code."""

    stage = "boot"

    def __init__(self, v: verdict.BootVerdict) -> None:
        super().__init__(f"the pKVM host did not come up: {v.reason}")
        self.verdict = v
        self.exit_code = v.exit_code if v.exit_code != ExitCode.PASS else ExitCode.TEST_FAILURE


class QemuTarget(ShellHelpers):
    name = "qemu"

    def __init__(self, spec: QemuSpec, run_dir: Path, *, transport: str = "console",
                 keys: GuestKeys | None = None, boot_timeout: float = 120.0) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}")
        if transport == "ssh":
            if keys is None:
                raise ValueError("the ssh transport needs the image's keys")
            spec = replace(spec, ssh_port=free_port())
        self.spec = spec
        self.run_dir = run_dir
        self.transport = transport
        self.keys = keys
        self.boot_timeout = boot_timeout
        self.boots = 0
        self.machine: QemuMachine | None = None
        self.shell: ConsoleShell | None = None
        self.ssh: SshSession | None = None
        self.mode: str | None = None
        self.start()

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        log = self.run_dir / ("console.log" if self.boots == 0 else f"console.{self.boots}.log")
        machine = QemuMachine(self.spec, log)
        self.machine = machine
        try:
            console = machine.start()
            deadline = machine.started_at + self.boot_timeout
            state = wait_ready(machine, console, deadline, READY_MARKER)
            if not state.ready or crashed(console):
                machine.stop()
                check_started(console.text(upto=state.judged_upto), machine, state.timed_out)
                raise BootFailed(verdict.judge(console.text(upto=state.judged_upto), ready_marker=READY_MARKER,
                                               timed_out=state.timed_out))
            self.mode = verdict.judge(console.text(), ready_marker=READY_MARKER).pkvm_mode
            self.shell = ConsoleShell(console)
            if self.transport == "ssh":
                assert self.keys is not None and self.spec.ssh_port is not None
                self.ssh = SshSession(SshParams(host="127.0.0.1", port=self.spec.ssh_port, user="root",
                                                key=self.keys.client_private,
                                                pinned_host_key=self.keys.host_public_line))
                try:
                    self.ssh.connect_until(deadline)
                except TargetError as e:
                    said = [line for line in console.text().splitlines() if "dropbear" in line]
                    if said:
                        e.message += f" (the guest said: {said[-1].strip()[:200]})"
                    raise
                console.start_pump()
        except BaseException:
            self._shutdown()
            raise
        self.boots += 1

    def _shutdown(self) -> None:
        if self.ssh:
            self.ssh.close()
            self.ssh = None
        if self.machine and self.machine.console:
            self.machine.console.stop_pump()
        machine, self.machine = self.machine, None
        if machine is None:
            return
        if machine.alive() and machine.console and not crashed(machine.console):
            with contextlib.suppress(Exception):
                machine.console.sendline("poweroff -f")
                machine.wait_exit(15)
        machine.stop()

    def reboot(self, timeout: float = 120.0) -> None:
        """A cold reboot: QEMU runs with -no-reboot, so the machine is powered off and booted again."""
        self._shutdown()
        self.boot_timeout = timeout
        self.start()

    def close(self) -> None:
        self._shutdown()

    def __enter__(self) -> "QemuTarget":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what tests use --------------------------------------------------------------------

    @property
    def qmp_socket(self) -> Path:
        return self.spec.qmp_socket

    def console_text(self) -> str:
        return self.machine.console.text() if self.machine and self.machine.console else ""

    def verdict(self) -> verdict.BootVerdict:
        """The console so far, judged: panics, WARNs and oopses since boot."""
        return verdict.judge(self.console_text(), ready_marker=READY_MARKER)

    def run(self, cmd: str, timeout: float = 60.0) -> CommandResult:
        self.commands.append(cmd)
        try:
            return self._run(cmd, timeout)
        except (CommandTimeout, TargetDead) as e:
            if isinstance(e, CommandTimeout) and e.target_alive:
                raise
            # A dead target is most often a panicked kernel or hypervisor: say so, with its line.
            # Over SSH nobody reads the console meanwhile: collect what it printed first.
            if self.ssh and self.machine and self.machine.console:
                self.machine.console.drain(3)
            panics = verdict.panics(self.console_text())
            if panics:
                raise TargetPanicked(cmd, panics[0].line) from e
            raise

    def _run(self, cmd: str, timeout: float) -> CommandResult:
        if self.machine is None or self.shell is None:
            raise TargetError("the QEMU target is not running", hint="it was closed or failed to boot")
        if not self.ssh:
            return self.shell.run(cmd, timeout)
        try:
            return self.ssh.run(cmd, timeout)
        except TargetDead as e:
            # The guest rebooted itself (QEMU without -no-reboot): SSH in again, once.
            if e.command_started or not self.machine.alive():
                raise
            self.ssh.connect_until(time.monotonic() + self.boot_timeout)
            return self.ssh.run(cmd, timeout)

    def put(self, local: Path, remote: str) -> None:
        if self.ssh:
            if not self.ssh.alive() and self.machine and self.machine.alive():
                self.ssh.connect_until(time.monotonic() + self.boot_timeout)
            return self.ssh.put(local, remote)
        # Heredocs of 76-column base64 lines: busybox's line editor truncates long input lines.
        data = local.read_bytes()
        self.run(f": > {remote}.b64").check()
        for i in range(0, len(data), _CHUNK):
            text = base64.encodebytes(data[i:i + _CHUNK]).decode()
            self.run(f"cat >> {remote}.b64 <<'PKH_EOF'\n{text}PKH_EOF", timeout=300).check()
        mode = f"{local.stat().st_mode & 0o777:o}"
        self.run(f"base64 -d {remote}.b64 > {remote} && rm {remote}.b64 && chmod {mode} {remote}", timeout=120).check()

    def get(self, remote: str, local: Path) -> None:
        if self.ssh:
            return self.ssh.get(remote, local)
        out = self.run(f"base64 {remote}", timeout=300).check().stdout
        local.write_bytes(base64.b64decode("".join(out.split())))
