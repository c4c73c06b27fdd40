"""The RSP client against a packet exchange recorded with QEMU 7.2's gdbstub on a 6.12 pKVM
host (tests/golden/gdbstub-session.log): a fake stub replays QEMU's side of it, packet by
packet, and checks that the client sends exactly what it sent then."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from harness.el2.gdbstub import GdbStub, RspError, checksum, decode_rle, frame, parse_registers, parse_stop

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "gdbstub-session.log"


def transcript() -> tuple[int, list[tuple[str, str]]]:
    lines = GOLDEN.read_text().splitlines()
    bp = int(lines[0].split()[-1], 16)
    return bp, [(line[0], line[2:]) for line in lines[1:] if line[:2] in ("> ", "< ")]


class FakeStub(threading.Thread):
    """Plays QEMU's side: acks each packet ('+', QEMU 7.2 has no no-ack mode) and answers with
    the recorded replies; records every mismatch with what the client should have sent."""

    def __init__(self, sock: socket.socket, script: list[tuple[str, str]]) -> None:
        super().__init__(daemon=True)
        self.sock, self.script, self.errors = sock, script, []
        self.buf = b""

    def _read_packet(self) -> str:
        while True:
            if self.buf[:1] == b"\x03":
                self.buf = self.buf[1:]
                return "^C"
            if self.buf[:1] == b"+":
                self.buf = self.buf[1:]
                continue
            end = self.buf.find(b"#")
            if self.buf[:1] == b"$" and end > 0 and len(self.buf) >= end + 3:
                data = self.buf[1:end]
                assert checksum(data) == self.buf[end + 1:end + 3]
                self.buf = self.buf[end + 3:]
                return data.decode()
            chunk = self.sock.recv(4096)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def run(self) -> None:
        try:
            for direction, payload in self.script:
                if direction == ">":
                    got = self._read_packet()
                    if got != payload:
                        self.errors.append(f"client sent {got!r}, QEMU got {payload!r} in the recording")
                        return
                    if got != "^C":
                        self.sock.sendall(b"+")
                else:
                    self.sock.sendall(frame(payload))
        except (EOFError, OSError) as e:
            self.errors.append(f"connection ended early: {e!r}")


@pytest.fixture
def stub(tmp_path):
    bp, script = transcript()
    server = socket.socket(socket.AF_UNIX)
    path = tmp_path / "gdb.sock"
    server.bind(str(path))
    server.listen(1)
    holder: dict = {}

    def accept():
        conn, _ = server.accept()
        holder["fake"] = FakeStub(conn, script)
        holder["fake"].start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield path, bp, holder, t
    server.close()


def test_the_recorded_tracing_session_replays(stub):
    path, bp, holder, accepting = stub
    g = GdbStub(path, timeout=5)
    accepting.join(5)
    assert g.initial_stop == "T05thread:01;"
    g.set_breakpoint(bp)
    g.resume()
    stop = g.wait_stop(5)
    assert (stop.signal, stop.thread, stop.cpu) == (5, "01", 0)
    regs = g.registers(stop.thread)
    assert regs.pc == bp and regs.el == 2          # a hit at EL2, at the breakpoint
    g.remove_breakpoint(bp)
    assert g.step(stop.thread).thread == "01"
    assert g.read_pc() == bp + 4                   # one instruction on (needs the target description)
    g.resume()
    assert g.interrupt().signal == 2
    g.close()
    holder["fake"].join(5)
    assert holder["fake"].errors == []


def test_a_silent_stub_times_out_within_the_deadline(tmp_path):
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "s"))
    server.listen(1)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        GdbStub(tmp_path / "s", timeout=0.5)
    assert time.monotonic() - start < 3
    server.close()


def test_a_pc_read_the_stub_refuses_is_an_error_not_address_zero(tmp_path):
    """QEMU answers `p` with an empty packet until target.xml has been read; taken as PC 0, that
    once hid steps that did not move and recorded calls twice."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "s"))
    server.listen(1)
    _, recorded = transcript()
    script = recorded[:6] + [(">", "qXfer:features:read:target.xml:0,ffb"), ("<", "l"), (">", "p20"), ("<", "")]

    held = []

    def serve():
        conn, _ = server.accept()
        held.append(conn)            # kept open: the client acks the last reply
        FakeStub(conn, script).run()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    g = GdbStub(tmp_path / "s", timeout=2)
    with pytest.raises(RspError, match="cannot read the PC"):
        g.read_pc()
    g.sock.close()
    server.close()


def test_packet_helpers():
    assert frame("OK") == b"$OK#9a"
    assert decode_rle("0* ") == "0" * 4                 # '0' then 3 more (' ' is 32 = 29 + 3)
    assert parse_stop("T05thread:p01.02;").thread == parse_stop("T05thread:02;").thread == "02"
    assert parse_stop("S05").thread is None and parse_stop("W00") is None
    regs = parse_registers("00" * (33 * 8) + "c9030000")
    assert regs.cpsr == 0x3C9 and regs.el == 2
    with pytest.raises(RspError):
        parse_registers("00" * 10)
