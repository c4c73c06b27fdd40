"""A small GDB remote serial protocol (RSP) client for QEMU's gdbstub.

Why our own client rather than gdb-multiarch in MI mode: a trace stops the machine thousands of
times, and each stop here costs a handful of short packets on one socket (stop reply, select the
thread, read the registers, continue), with no second debugger process to start, feed, parse and
reliably kill. The protocol subset QEMU needs is small: qSupported, QStartNoAckMode, ?,
qXfer:features:read (QEMU answers `p` with an empty packet until the client has read the target
description, as gdb always does), Hg, g, p, m,
Z1/z1 (hardware breakpoints; TCG treats Z0 the same), vCont;s (step one vCPU over a breakpoint,
as QEMU re-triggers one at the PC it resumes from), c, the 0x03 interrupt, and D (detach).

Every wait has a deadline. `close()` always detaches first, so a machine is never left stopped.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# aarch64 "g" layout in QEMU (gdb-xml/aarch64-core.xml): x0..x30, sp, pc (8 bytes each), cpsr (4).
NUM_X = 31
_STOP_RE = re.compile(r"^T([0-9a-fA-F]{2})(.*)$")


class RspError(OSError):
    pass


@dataclass(frozen=True)
class Stop:
    signal: int
    thread: str | None        # QEMU's thread id of the vCPU that stopped ("01" is CPU 0)
    raw: str

    @property
    def cpu(self) -> int | None:
        return int(self.thread, 16) - 1 if self.thread else None


@dataclass(frozen=True)
class Registers:
    x: tuple[int, ...]
    sp: int
    pc: int
    cpsr: int

    @property
    def el(self) -> int:
        return (self.cpsr >> 2) & 3


def checksum(data: bytes) -> bytes:
    return b"%02x" % (sum(data) % 256)


def frame(payload: str) -> bytes:
    data = payload.encode()
    return b"$" + data + b"#" + checksum(data)


def decode_rle(data: str) -> str:
    """Undo RSP run-length encoding: 'X*' + chr(n + 29) repeats X n more times."""
    out: list[str] = []
    i = 0
    while i < len(data):
        if data[i] == "*" and out:
            out.append(out[-1] * (ord(data[i + 1]) - 29))
            i += 2
        else:
            out.append(data[i])
            i += 1
    return "".join(out)


def parse_stop(reply: str) -> Stop | None:
    """'T05thread:01;' -> Stop(5, '01'); 'S05' -> Stop(5, None); W/X (exited) -> None."""
    if m := _STOP_RE.match(reply):
        thread = None
        for item in m.group(2).split(";"):
            if item.startswith("thread:"):
                thread = item.split(":", 1)[1].split(".")[-1]
        return Stop(int(m.group(1), 16), thread, reply)
    if reply.startswith("S") and len(reply) >= 3:
        return Stop(int(reply[1:3], 16), None, reply)
    return None


def parse_registers(hexdata: str) -> Registers:
    raw = bytes.fromhex(hexdata)
    if len(raw) < NUM_X * 8 + 20:
        raise RspError(f"register packet too short ({len(raw)} bytes)")
    words = [int.from_bytes(raw[i * 8:(i + 1) * 8], "little") for i in range(NUM_X + 2)]
    cpsr = int.from_bytes(raw[(NUM_X + 2) * 8:(NUM_X + 2) * 8 + 4], "little")
    return Registers(tuple(words[:NUM_X]), words[NUM_X], words[NUM_X + 1], cpsr)


class GdbStub:
    def __init__(self, address: tuple[str, int] | Path, timeout: float = 10.0, log: list[str] | None = None):
        self.timeout = timeout
        self.log = log            # if given, every packet in and out ("> ..." / "< ..."), for transcripts
        self._buf = b""
        self._ack = True
        self.steps_repeated = 0   # single-steps past a breakpoint that had to be repeated
        self._attached = False
        family = socket.AF_UNIX if isinstance(address, Path) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(address) if isinstance(address, Path) else address)
            self._attached = True
            self.command("qSupported:swbreak+;hwbreak+")
            if self.command("QStartNoAckMode") == "OK":
                self._ack = False
            self.initial_stop = self.command("?")      # QEMU stops every vCPU for a debugger
            self._read_target_description()
        except BaseException:
            self.close()
            raise

    # --- packets ---------------------------------------------------------------------------

    def _send(self, payload: str) -> None:
        if self.log is not None:
            self.log.append(f"> {payload}")
        self.sock.sendall(frame(payload))
        if self._ack:
            self._read_ack()

    def _read_ack(self) -> None:
        while True:
            if self._buf:
                c, self._buf = self._buf[:1], self._buf[1:]
                if c == b"+":
                    return
                if c == b"-":
                    raise RspError("packet rejected by the stub (bad checksum)")
                continue
            self._fill(time.monotonic() + self.timeout)

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("gdbstub did not answer in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError("gdbstub did not answer in time") from None
        if not data:
            raise RspError("gdbstub closed the connection")
        self._buf += data

    def recv(self, deadline: float) -> str:
        """The next packet's payload (acks and stray bytes before '$' are skipped)."""
        while True:
            start = self._buf.find(b"$")
            end = self._buf.find(b"#", start + 1) if start >= 0 else -1
            if start >= 0 and end >= 0 and len(self._buf) >= end + 3:
                data, cs = self._buf[start + 1:end], self._buf[end + 1:end + 3]
                self._buf = self._buf[end + 3:]
                if checksum(data) != cs.lower():
                    raise RspError(f"bad checksum on packet {data[:40]!r}")
                if self._ack:
                    self.sock.sendall(b"+")
                payload = decode_rle(data.decode(errors="replace"))
                if self.log is not None:
                    self.log.append(f"< {payload}")
                return payload
            self._fill(deadline)

    def command(self, payload: str) -> str:
        self._send(payload)
        return self.recv(time.monotonic() + self.timeout)

    def _read_target_description(self) -> None:
        """Read target.xml to its end ('l'): QEMU enables single-register reads only after it."""
        offset = 0
        for _ in range(64):
            reply = self.command(f"qXfer:features:read:target.xml:{offset:x},ffb")
            if reply[:1] == "l":
                return
            if reply[:1] != "m":
                raise RspError(f"cannot read the target description: {reply!r}")
            offset += len(reply) - 1
        raise RspError("the target description did not end")

    # --- what the tracer uses ----------------------------------------------------------------

    def set_breakpoint(self, addr: int) -> None:
        reply = self.command(f"Z1,{addr:x},4")
        if reply != "OK":
            raise RspError(f"cannot set a hardware breakpoint at {addr:#x}: {reply or 'not supported'}")

    def remove_breakpoint(self, addr: int) -> None:
        self.command(f"z1,{addr:x},4")

    def registers(self, thread: str | None) -> Registers:
        if thread is not None:
            reply = self.command(f"Hg{thread}")
            if reply != "OK":
                raise RspError(f"cannot select thread {thread}: {reply}")
        return parse_registers(self.command("g"))

    def step(self, thread: str | None, timeout: float = 5.0) -> Stop | None:
        """Single-step one vCPU while the others stay stopped (vCont with one action)."""
        self._send(f"vCont;s:{thread}" if thread else "s")
        return self.wait_stop(timeout)

    def threads(self) -> list[str]:
        """Every vCPU's thread id (qfThreadInfo / qsThreadInfo)."""
        out: list[str] = []
        reply = self.command("qfThreadInfo")
        while reply.startswith("m"):
            out += [t.split(".")[-1] for t in reply[1:].split(",") if t]
            reply = self.command("qsThreadInfo")
        return out

    def read_pc(self) -> int:
        """The selected vCPU's PC (register 32 in QEMU's aarch64 numbering)."""
        reply = self.command("p20")
        if len(reply) != 16:     # an empty reply would read as PC 0 and hide a step that did not move
            raise RspError(f"cannot read the PC: {reply!r}")
        return int.from_bytes(bytes.fromhex(reply), "little")

    def write_register(self, number: int, value: int) -> None:
        """Set one register of the selected vCPU (QEMU's aarch64 numbering: x0..x30, sp 31, pc 32)."""
        reply = self.command(f"P{number:x}={value.to_bytes(8, 'little').hex()}")
        if reply != "OK":
            raise RspError(f"cannot write register {number}: {reply!r}")

    def read_memory(self, addr: int, length: int) -> bytes:
        """`length` bytes at a virtual address, through the selected vCPU's current translation."""
        reply = self.command(f"m{addr:x},{length:x}")
        if reply.startswith("E") or len(reply) != 2 * length:
            raise RspError(f"cannot read {length} bytes at {addr:#x}: {reply}")
        return bytes.fromhex(reply)

    def any_at_el2(self) -> bool:
        """Is any vCPU executing hyp code? (A vCPU at EL1/EL0 has no hyp call half done.)"""
        return any(self.registers(thread).el == 2 for thread in self.threads())

    def run_until_outside_el2(self, bursts: int = 200) -> None:
        """With the machine stopped: run it in short bursts until no vCPU is at EL2, so no hyp
        call is half done (nor holds a pool lock) when it is stopped."""
        for _ in range(bursts):
            if not self.any_at_el2():
                return
            self.resume()
            time.sleep(0.002)
            self.interrupt(self.timeout)
        raise RuntimeError(f"a vCPU stayed at EL2 for {bursts} bursts")

    def step_past(self, thread: str | None, pc: int) -> None:
        """Continuing from a breakpoint would stop on it again at once. QEMU (7.1+) lets a
        single-step override the breakpoint under the PC, so one step of this vCPU gets past it
        without removing it (removing and re-inserting would also throw away translated code).
        A step now and then ends where it began (seen under load); resuming from there would
        see the call twice, so the PC is checked and the step repeated (`steps_repeated`)."""
        for repeats in range(8):
            self.step(thread, self.timeout)
            if self.read_pc() != pc:
                self.steps_repeated += repeats
                return
        raise RuntimeError(f"CPU {thread} does not step past the breakpoint at {pc:#x}")

    def serve(self, stopping: threading.Event, on_hit: Callable[[Stop, Registers], bool],
              done: Callable[[], bool] = lambda: True, poll: float = 0.2) -> None:
        """Answer breakpoint stops until `stopping` is set. Each stop goes to `on_hit` with the
        registers of the vCPU that stopped (QEMU selects it); unless it says it moved the PC
        itself, the vCPU is stepped past the breakpoint; then the machine runs on. Once
        `stopping` is set the machine is interrupted, and left stopped when `done()` says so
        (else it runs on, and is asked again at the next quiet poll)."""
        while True:
            stop = self.wait_stop(poll)
            if stop is None:
                if stopping.is_set():
                    self.interrupt(self.timeout)
                    if done():
                        return
                    self.resume()
                continue
            regs = self.registers(None)
            if not on_hit(stop, regs):
                self.step_past(stop.thread, regs.pc)
            self.resume()

    def resume(self) -> None:
        """Continue every vCPU; the next stop arrives through wait_stop()."""
        self._send("c")

    def wait_stop(self, timeout: float) -> Stop | None:
        """The next stop reply, or None if none came within `timeout` seconds."""
        try:
            reply = self.recv(time.monotonic() + timeout)
        except TimeoutError:
            return None
        stop = parse_stop(reply)
        if stop is None:
            raise RspError(f"the machine is gone: {reply}")
        return stop

    def read_physical(self, pa: int, length: int) -> bytes:
        """`length` bytes at a physical address (QEMU's Qqemu.PhyMemMode)."""
        with self._physical():
            return self.read_memory(pa, length)

    def write_physical(self, pa: int, data: bytes) -> None:
        """Write `data` at a physical address: how a test holds an EL2 lock by hand."""
        with self._physical():
            reply = self.command(f"M{pa:x},{len(data):x}:{data.hex()}")
        if reply != "OK":
            raise RspError(f"cannot write {len(data)} bytes at PA {pa:#x}: {reply!r}")

    @contextlib.contextmanager
    def _physical(self) -> Iterator[None]:
        if self.command("Qqemu.PhyMemMode:1") != "OK":
            raise RspError("this QEMU's gdbstub has no physical memory mode")
        try:
            yield
        finally:
            self.command("Qqemu.PhyMemMode:0")

    def interrupt(self, timeout: float = 5.0) -> Stop | None:
        if self.log is not None:
            self.log.append("> ^C")
        self.sock.sendall(b"\x03")
        return self.wait_stop(timeout)

    def detach(self) -> None:
        if self._attached:
            self._attached = False
            with contextlib.suppress(OSError, TimeoutError):
                self.command("D")

    def close(self) -> None:
        """Detach (the machine runs on) and close. Safe to call twice."""
        self.detach()
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> GdbStub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
