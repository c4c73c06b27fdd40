"""Start and stop qemu-system-aarch64 for a pKVM host.

The machine is always `virt,virtualization=on` (EL2 for the host kernel) with GICv3; the kernel
command line always asks for `kvm-arm.mode=protected`. QEMU is always ended, by its PID: first
politely over QMP, then by signal.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pexpect

from harness.errors import UsageError
from harness.kernel.version import KernelVersion
from harness.procs import die_with_parent
from harness.targets.console import Console
from harness.targets.sockchild import SocketChild

MACHINE = "virt,virtualization=on,gic-version=3"
BASE_CMDLINE = "console=ttyAMA0 kvm-arm.mode=protected panic=-1 rdinit=/init"
# AF_UNIX paths are limited to 108 bytes; longer run-dir paths get a socket in /tmp.
_SUN_PATH_MAX = 100

# QEMU CPUs with VHE (ARMv8.1+) run a kernel that knows hVHE (KernelVersion.has_hvhe) in hVHE;
# the others in nVHE.
VHE_CPUS = {"max", "host", "cortex-a76", "cortex-a710", "neoverse-n1", "neoverse-n2", "neoverse-v1", "a64fx"}
NON_VHE_CPUS = {"cortex-a53", "cortex-a57", "cortex-a72"}


def kernel_knows_hvhe(image: Path, version: KernelVersion | None = None) -> bool:
    """KernelVersion.has_hvhe when the kernel's version is known; else the Image itself says: the
    `arm64_sw.hvhe` override's name is in the Image of a kernel that has hVHE."""
    if version is not None:
        return version.has_hvhe
    return b"hvhe" in image.read_bytes()


def expected_pkvm_mode(cpu: str, image: Path, version: KernelVersion | None = None) -> str | None:
    """The mode kvm-arm.mode=protected gives on this QEMU CPU with this kernel (`version` if known,
    else judged from the Image); None if unknown."""
    if cpu in NON_VHE_CPUS:
        return "nVHE"
    if cpu in VHE_CPUS:
        return "hVHE" if kernel_knows_hvhe(image, version) else "nVHE"
    return None


@dataclass(frozen=True)
class QemuSpec:
    kernel: Path
    initrd: Path
    qmp_socket: Path
    ready_marker: str               # the line the image's init prints when its shell is ready
    cpu: str = "max"
    smp: int = 2
    mem: str = "1024"
    ram_regions: tuple[int, ...] = ()   # MiB per NUMA node (then -m is their sum); () : one region
    append: str = ""
    qemu: str = "qemu-system-aarch64"
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    ssh_port: int | None = None     # user networking with 127.0.0.1:ssh_port -> guest :22
    no_reboot: bool = True          # a guest reboot (or panic) ends QEMU; False lets it reset
    gdb_socket: Path | None = None  # QEMU's gdbstub on a unix socket (EL2 tracing)
    console_pty: bool = False       # a pty for the console (a person's terminal); else a socket pair
    plugin: tuple[Path, Path, Path] | None = None   # el2trace: (library, spec, stream file)

    def cmdline(self) -> str:
        return f"{BASE_CMDLINE} {self.append}".strip()

    def argv(self) -> list[str]:
        return [
            self.qemu, "-M", MACHINE, "-cpu", self.cpu, "-smp", str(self.smp), *self.memory_args(),
            # signal=off: a Ctrl-C sent to the console reaches the guest, not QEMU
            "-display", "none", "-monitor", "none", "-chardev", "stdio,id=con0,signal=off",
            "-serial", "chardev:con0", *(["-no-reboot"] if self.no_reboot else []),
            *self.net_args(),
            "-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", self.cmdline(),
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            # a unix socket: over TCP, Nagle on QEMU's side and delayed ACKs cost 40 ms a packet
            *(["-gdb", f"unix:{self.gdb_socket},server=on,wait=off"] if self.gdb_socket else []),
            *(["-plugin", f"{self.plugin[0]},spec={self.plugin[1]},out={self.plugin[2]}"] if self.plugin else []),
            *self.extra_args,
        ]

    def memory_args(self) -> list[str]:
        """-m, and with ram_regions a NUMA node per region (the CPUs on the first; the others
        memory only): each becomes a memblock of its own, contiguous with the next."""
        if not self.ram_regions:
            return ["-m", self.mem]
        out = ["-m", f"{sum(self.ram_regions)}M"]
        for i, size in enumerate(self.ram_regions):
            cpus = f",cpus=0-{self.smp - 1}" if i == 0 else ""
            out += ["-object", f"memory-backend-ram,id=ram{i},size={size}M",
                    "-numa", f"node,nodeid={i},memdev=ram{i}{cpus}"]
        return out

    def net_args(self) -> list[str]:
        if self.ssh_port is None:
            return ["-nic", "none"]
        # romfile= : no iPXE option ROM (the kernel boots directly; the ROM package is not needed)
        return ["-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
                "-device", "virtio-net-pci,netdev=n0,romfile="]

    def shell_line(self) -> str:
        """The exact command, pasteable into a shell."""
        return shlex.join(self.argv())


def socket_path(run_dir: Path, name: str = "qmp.sock") -> Path:
    """A unix socket path in the run directory, or in /tmp when that path would be too long."""
    path = run_dir.resolve() / name
    if len(str(path)) <= _SUN_PATH_MAX:
        return path
    return Path(tempfile.mkdtemp(prefix="pkvm-sock-")) / name


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (QEMU binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_qemu(qemu: str) -> str:
    found = shutil.which(qemu)
    if not found:
        raise UsageError(f"QEMU binary {qemu} not found",
                         hint="run `make setup` (installs qemu-system-arm) or pass --qemu PATH")
    return found


class QemuMachine:
    """A running QEMU with its serial console. Use as a context manager: exit always stops it."""

    def __init__(self, spec: QemuSpec, console_log: Path) -> None:
        self.spec = spec
        self.console_log = console_log
        self.child: pexpect.spawn | SocketChild | None = None
        self.console: Console | None = None
        self.started_at = 0.0
        self.exit_status: int | None = None

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    def start(self) -> Console:
        find_qemu(self.spec.qemu)
        self.spec.qmp_socket.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.spec.qmp_socket.unlink()
        argv = self.spec.argv()
        env = dict(os.environ, TERM="dumb")
        self.started_at = time.monotonic()
        if self.spec.console_pty:
            # A wide pty, so long console lines are not wrapped by the terminal layer.
            # die_with_parent: QEMU is killed with the harness, even a SIGKILLed one (which stops
            # nothing itself), as SocketChild does for the socket console.
            self.child = pexpect.spawn(argv[0], argv[1:], encoding=None, echo=False,
                                       dimensions=(50, 4000), env=env, maxread=1 << 16,
                                       preexec_fn=die_with_parent(signal.SIGKILL))
        else:
            self.child = SocketChild(argv, env)
        self.console = Console(self.child, self.console_log)
        return self.console

    def alive(self) -> bool:
        return bool(self.child and self.child.isalive())

    def wait_exit(self, seconds: float) -> bool:
        """Wait up to `seconds` for QEMU to exit by itself (power-off, panic with -no-reboot)."""
        deadline = time.monotonic() + seconds
        while self.alive() and time.monotonic() < deadline:
            with contextlib.suppress(pexpect.TIMEOUT, pexpect.EOF):
                assert self.child is not None
                self.child.expect(pexpect.EOF, timeout=min(0.5, max(0.0, deadline - time.monotonic())))
        return not self.alive()

    def stop(self) -> None:
        """End QEMU: QMP `quit`, then SIGTERM/SIGKILL to its PID. Idempotent."""
        if self.child is None:
            return
        if self.alive():
            self._qmp_quit()
            if not self.wait_exit(3.0):
                self.child.terminate(force=True)
        with contextlib.suppress(Exception):
            self.child.close(force=True)
        self.exit_status = self.child.exitstatus if self.child.exitstatus is not None else self.child.signalstatus
        if self.console:
            self.console.close()

    def _qmp_quit(self) -> None:
        if not self.spec.qmp_socket.exists():
            return
        # QEMU may close the socket before it answers `quit`, or be gone already: signals follow.
        with contextlib.suppress(Exception):
            from harness.targets import qmp  # a machine that powers itself off never needs asyncio

            qmp.execute(self.spec.qmp_socket, "quit", timeout=2.0)

    def __enter__(self) -> QemuMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
