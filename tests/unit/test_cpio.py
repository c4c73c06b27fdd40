import os
import stat
import subprocess

import pytest

from harness.image.cpio import Entry, write_newc


def _parse(data: bytes):
    """Minimal independent newc reader: [(name, mode, filesize, rdevmajor, rdevminor, data)]."""
    out, off = [], 0
    while True:
        assert data[off:off + 6] == b"070701"
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[off + 110: off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        body = data[off: off + filesize]
        off = (off + filesize + 3) & ~3
        if name == "TRAILER!!!":
            assert off == len(data)
            return out
        out.append((name, f[1], filesize, f[9], f[10], body))


def sample():
    return [Entry.file("init", b"#!/bin/sh\necho hi\n", 0o755), Entry.symlink("bin/sh", "busybox"),
            Entry.file("bin/busybox", b"\x7fELF" + bytes(range(7))), Entry.chardev("dev/console", 5, 1)]


def test_headers_padding_parents_and_order():
    entries = _parse(write_newc(sample()))
    assert [e[0] for e in entries] == ["bin", "bin/busybox", "bin/sh", "dev", "dev/console", "init"]
    by = {e[0]: e for e in entries}
    assert stat.S_ISDIR(by["bin"][1])
    assert by["bin/sh"][5] == b"busybox" and stat.S_ISLNK(by["bin/sh"][1])
    assert stat.S_ISCHR(by["dev/console"][1]) and by["dev/console"][3:5] == (5, 1)
    assert by["init"][1] & 0o777 == 0o755 and by["init"][5] == b"#!/bin/sh\necho hi\n"


def test_same_inputs_same_bytes_regardless_of_order():
    a = write_newc(sample())
    b = write_newc(list(reversed(sample())))
    assert a == b


def test_duplicate_paths_are_an_error():
    with pytest.raises(ValueError, match="duplicate"):
        write_newc([Entry.file("a", b"1"), Entry.file("/a", b"2")])


def test_gnu_cpio_reads_it(tmp_path):
    image = tmp_path / "img.cpio"
    image.write_bytes(write_newc(sample()))
    listing = subprocess.run(["cpio", "-it", "--quiet"], stdin=open(image, "rb"),
                             capture_output=True, text=True, check=True).stdout.split()
    assert sorted(listing) == ["bin", "bin/busybox", "bin/sh", "dev", "dev/console", "init"]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames", "--nonmatching", "dev/console"],
                   stdin=open(image, "rb"), cwd=out, check=True)
    assert (out / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.readlink(out / "bin/sh") == "busybox"
    assert os.stat(out / "init").st_mode & 0o777 == 0o755
