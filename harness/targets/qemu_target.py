"""QemuTarget: a booted pKVM host under QEMU, driven over its serial console or over SSH."""

from __future__ import annotations

import base64
import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from harness import verdict
from harness.targets import qemu_boot
from harness.targets.base import CommandResult, CommandTimeout, TargetDead, TargetError, TargetInfo, TargetPanicked
from harness.targets.console import ConsoleShell
from harness.targets.qemu import QemuMachine, QemuSpec, free_port
from harness.targets.shell import ShellHelpers

if TYPE_CHECKING:
    from harness.targets.ssh import SshSession

TRANSPORTS = ("console", "ssh")
_CHUNK = 48 * 1024   # bytes per console upload command (base64 lines stay short)
_POWEROFF_DEADLINE = 15.0


def spec_for_transport(spec: QemuSpec, transport: str, ssh_port: int | None = None) -> QemuSpec:
    """The spec a transport boots: SSH adds user networking with a forwarded port (free now)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}")
    return replace(spec, ssh_port=ssh_port or free_port()) if transport == "ssh" else spec


@dataclass(frozen=True)
class GuestLogin:
    """How the harness logs in to the image's dropbear: its client key and the pinned host key."""

    client_key: Path
    host_key_line: str


class QemuTarget(ShellHelpers):
    """Booted on construction (BootFailed says why not); `close()` powers it off.

    Capabilities (harness.targets.base): Shell, Files, ConsoleLog always; El2Memory when a
    vmlinux is given; Debugger when the spec has a gdbstub socket.
    """

    name = "qemu"

    def __init__(self, spec: QemuSpec, run_dir: Path, *, transport: str = "console",
                 login: GuestLogin | None = None, boot_timeout: float = 120.0,
                 vmlinux: Path | None = None, expect_mode: str | None = None) -> None:
        if transport == "ssh" and login is None:
            raise ValueError("the ssh transport needs the image's keys")
        self.spec = spec_for_transport(spec, transport)
        self.run_dir = run_dir
        self.transport = transport
        self.login = login
        self.boot_timeout = boot_timeout
        self.expect_mode = expect_mode
        self._vmlinux = vmlinux
        self.boots = 0
        self.machine: QemuMachine | None = None
        self.last_machine: QemuMachine | None = None    # kept after power-off: its console and exit status
        self.ready: qemu_boot.ReadyState | None = None
        self.shell: ConsoleShell | None = None
        self.ssh: SshSession | None = None
        self.mode: str | None = None
        self.start()

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        log = self.run_dir / ("console.log" if self.boots == 0 else f"console.{self.boots}.log")
        machine = QemuMachine(self.spec, log)
        self.machine = self.last_machine = machine
        try:
            console, self.ready = qemu_boot.start(machine, self.boot_timeout, self.expect_mode)
            self.mode = qemu_boot.judge(machine, console.text()).pkvm_mode
            self.shell = ConsoleShell(console)
            if self.transport == "ssh":
                from harness.targets.ssh import SshParams, SshSession  # paramiko: 0.1 s, only for ssh

                assert self.login is not None and self.spec.ssh_port is not None
                self.ssh = SshSession(SshParams(host="127.0.0.1", port=self.spec.ssh_port, user="root",
                                                key=self.login.client_key,
                                                pinned_host_key=self.login.host_key_line))
                try:
                    self.ssh.connect_until(machine.started_at + self.boot_timeout)
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
        # A machine that panicked may hang rather than exit: do not wait on a power-off then.
        if machine.alive() and machine.console and not qemu_boot.crashed(machine.console):
            with contextlib.suppress(Exception):
                machine.console.sendline("poweroff -f")
                machine.wait_exit(_POWEROFF_DEADLINE)
        machine.stop()

    def reboot(self, timeout: float = 120.0) -> None:
        """A cold reboot: QEMU runs with -no-reboot, so the machine is powered off and booted again."""
        self._shutdown()
        self.boot_timeout = timeout
        self.start()

    def close(self) -> None:
        self._shutdown()

    def final_verdict(self) -> verdict.BootVerdict:
        """The whole console of the last boot judged, once the machine is off (WARNs printed at
        power-off count); with --expect-mode, the mode must match."""
        assert self.last_machine is not None
        return qemu_boot.judge(self.last_machine, self.console_text(), expect_mode=self.expect_mode)

    def __enter__(self) -> QemuTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def death(self) -> str | None:
        found = verdict.panics(self.console_text())
        if found:
            return f"{found[0].kind}: {found[0].line}"
        if self.machine is None or not self.machine.alive():
            status = self.last_machine.exit_status if self.last_machine else None
            return f"QEMU is not running (exit status {status})"
        return None

    def describe(self) -> TargetInfo:
        return TargetInfo("qemu", self.name, self.mode, self.spec.cpu, self.spec.smp, str(self.spec.mem),
                          self.transport)

    # --- what tests use --------------------------------------------------------------------

    @property
    def qmp_socket(self) -> Path:
        return self.spec.qmp_socket

    # A missing capability raises AttributeError, so isinstance(target, El2Memory / Debugger) is False.
    @property
    def vmlinux(self) -> Path:
        if self._vmlinux is None:
            raise AttributeError("this QEMU target was started without its vmlinux: EL2 cannot be decoded")
        return self._vmlinux

    @property
    def gdb_socket(self) -> Path:
        if self.spec.gdb_socket is None:
            raise AttributeError("this QEMU target was started without a gdbstub")
        return self.spec.gdb_socket

    def console_text(self) -> str:
        m = self.machine or self.last_machine
        return m.console.text() if m and m.console else ""

    def verdict(self) -> verdict.BootVerdict:
        """The console so far, judged: panics, WARNs and oopses since boot."""
        assert self.last_machine is not None
        return qemu_boot.judge(self.last_machine, self.console_text())

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
