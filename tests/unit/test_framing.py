"""Console framing on transcripts: echo, escape codes, kernel lines mid-output, big outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.targets.framing import Frame, clean, parse

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def body_for(frame: Frame, stdout: bytes, status: int, stderr: bytes) -> bytes:
    """What the shell prints between the begin and end markers for frame.wrap(cmd)."""
    m = frame.marker.encode()
    return stdout + b"\r\n" + m + b"-S:" + str(status).encode() + b"\r\n" + stderr + b"\r\n"


def test_wrap_never_contains_its_own_markers():
    f = Frame("PKHabc123")
    line = f.wrap("ls /")
    assert not f.begin().search(line.encode()) and not f.end().search(line.encode())
    assert "PKHabc123-S" not in line


def test_stdout_stderr_and_status_are_separated():
    f = Frame("PKH000001")
    p = parse(body_for(f, b"line one\r\nline two", 3, b"oops: no such file"), f)
    assert (p.stdout, p.stderr, p.status) == ("line one\nline two", "oops: no such file", 3)


def test_output_ending_with_newline_keeps_it():
    f = Frame("PKH000002")
    p = parse(body_for(f, b"a\r\n", 0, b""), f)
    assert p.stdout == "a\n" and p.stderr == ""


def test_kernel_messages_mid_line_are_lifted_out():
    f = Frame("PKH000003")
    out = (b"first half[   12.345678] kvm [1]: some hypervisor message\r\n of the line\r\n"
           b"[   12.400000] virtio_net virtio0 eth0: link up\r\nlast")
    p = parse(body_for(f, out, 0, b""), f)
    assert p.stdout == "first half of the line\nlast"
    assert p.kernel_lines == ["[   12.345678] kvm [1]: some hypervisor message",
                              "[   12.400000] virtio_net virtio0 eth0: link up"]


def test_kernel_message_between_status_and_stderr():
    f = Frame("PKH000004")
    body = b"out\r\n[    3.000001] random: crng init done\r\nPKH000004-S:1\r\nerr\r\n"
    p = parse(body, f)
    assert (p.stdout, p.status, p.stderr) == ("out", 1, "err")


def test_escape_codes_are_stripped():
    f = Frame("PKH000005")
    p = parse(body_for(f, b"\x1b[1;32mgreen\x1b[0m \x1b[6nplain", 0, b""), f)
    assert p.stdout == "green plain"
    assert clean(b"\x1b(B\x1b[?2004hx\r\n")[0] == b"x\n"


def test_output_that_looks_like_a_status_line_does_not_fool_the_parser():
    f = Frame("PKH000006")
    p = parse(body_for(f, b"PKH000006-S:99 (printed by the command)\r\nPKH000006-S:7", 0, b""), f)
    assert p.status == 0 and p.stdout.endswith("PKH000006-S:7")


def test_megabytes_of_output():
    f = Frame("PKH000007")
    big = b"".join(b"%07d\r\n" % i for i in range(300_000))   # 2.7 MB
    p = parse(body_for(f, big, 0, b""), f)
    assert len(p.stdout) == 300_000 * 8 and p.stdout.endswith("0299999\n")


def test_missing_status_marker_is_an_error():
    with pytest.raises(ValueError, match="no status marker"):
        parse(b"garbage\r\n", Frame("PKH000008"))
