"""Console framing on transcripts: echo, escape codes, kernel lines, big outputs.

`shell()` produces what the guest's busybox prints for Frame.wrap() (checked against the
recorded transcript tests/golden/console-framing.log, made on a real 6.12 pKVM boot)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.targets.framing import PREFIX, Frame, clean, parse

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
RS = PREFIX


def stream(b: bytes) -> bytes:
    """sed 's/^/\\x1e/' then `echo`, with the tty's CRLF."""
    if not b:
        return b"\r\n"
    trailing = b.endswith(b"\n")
    lines = (b[:-1] if trailing else b).split(b"\n")
    return b"".join(RS + line + b"\r\n" for line in lines) + (b"\r\n" if trailing else b"")


def shell(frame: Frame, stdout: bytes, status: int, stderr: bytes) -> bytes:
    return stream(stdout) + f"{frame.marker}-S:{status}\r\n".encode() + stream(stderr)


def test_wrap_never_contains_its_own_markers():
    f = Frame("PKHabc123")
    line = f.wrap("ls /").encode()
    assert not f.begin().search(line) and not f.end().search(line) and not f.status().search(line)


@pytest.mark.parametrize("out", [b"", b"\n", b"a", b"a\n", b"a\nb", b"a\n\nb\n", b"\n\n"])
def test_trailing_newlines_and_empty_lines_are_exact(out):
    f = Frame("PKH000001")
    p = parse(shell(f, out, 0, b"e"), f)
    assert p.stdout == out.decode() and p.stderr == "e" and p.kernel_lines == []


def test_stdout_stderr_and_status_are_separated():
    f = Frame("PKH000002")
    p = parse(shell(f, b"line one\nline two\n", 3, b"oops: no such file\n"), f)
    assert (p.stdout, p.stderr, p.status) == ("line one\nline two\n", "oops: no such file\n", 3)


def test_kernel_lines_between_output_lines_are_lifted_out():
    f = Frame("PKH000003")
    body = shell(f, b"one\ntwo\n", 0, b"")
    body = body.replace(RS + b"two", b"[   12.400000] virtio_net virtio0 eth0: link up\r\n" + RS + b"two")
    p = parse(body, f)
    assert p.stdout == "one\ntwo\n"
    assert p.kernel_lines == ["[   12.400000] virtio_net virtio0 eth0: link up"]


def test_kernel_line_in_the_middle_of_an_output_line_is_cut_out_and_the_line_joined():
    f = Frame("PKH000004")
    body = shell(f, b"first half of the line\nnext\n", 0, b"")
    body = body.replace(b"first half", b"first half[   12.345678] kvm [1]: a hypervisor message\r\n")
    p = parse(body, f)
    assert p.stdout == "first half of the line\nnext\n"
    assert p.kernel_lines == ["[   12.345678] kvm [1]: a hypervisor message"]


def test_dmesg_output_is_output_not_kernel_noise():
    f = Frame("PKH000005")
    dmesg = b"[    0.000000] Booting Linux on physical CPU 0x0\n[    0.512345] kvm [1]: Protected hVHE mode\n"
    p = parse(shell(f, dmesg, 0, b""), f)
    assert p.stdout == dmesg.decode() and p.kernel_lines == []


def test_escape_codes_are_stripped():
    f = Frame("PKH000006")
    p = parse(shell(f, b"\x1b[1;32mgreen\x1b[0m \x1b[6nplain", 0, b""), f)
    assert p.stdout == "green plain"
    assert clean(b"\x1b(B\x1b[?2004hx\r\n") == b"x\n"


def test_output_that_looks_like_a_status_line_does_not_fool_the_parser():
    f = Frame("PKH000007")
    p = parse(shell(f, b"PKH000007-S:99\n", 0, b"PKH000007-S:5\n"), f)
    assert p.status == 0 and p.stdout == "PKH000007-S:99\n" and p.stderr == "PKH000007-S:5\n"


def test_megabytes_of_output():
    f = Frame("PKH000008")
    big = b"".join(b"%07d\n" % i for i in range(300_000))   # 2.4 MB
    p = parse(shell(f, big, 0, b""), f)
    assert len(p.stdout) == len(big) and p.stdout.endswith("0299999\n")


def test_missing_status_marker_is_an_error():
    with pytest.raises(ValueError, match="no status marker"):
        parse(b"garbage\r\n", Frame("PKH000009"))


def test_recorded_transcript_from_a_real_guest():
    """A real console session (see tests/golden/README.md): every framed command in it parses
    to the stdout, stderr and status the recording names."""
    raw = (GOLDEN / "console-framing.log").read_bytes()
    expected = [
        ("PKH00000000c0de", "out\n", "err\n", 7),
        ("PKH00000000c0df", "a", "", 0),
        ("PKH00000000c0e0", "", "", 1),
    ]
    for marker, stdout, stderr, status in expected:
        f = Frame(marker)
        begin, end = f.begin().search(raw), f.end().search(raw)
        assert begin and end, marker
        p = parse(raw[begin.end(): end.start()], f)
        assert (p.stdout, p.stderr, p.status) == (stdout, stderr, status), marker
    assert re.search(rb"kvm|\[ *\d+\.\d{6}\]", raw)     # kernel lines were on this console too
