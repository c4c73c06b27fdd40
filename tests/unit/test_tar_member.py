"""take_tar_member (harness.fsutil): one member out of an archive, whole or not at all, as the
plugin header (harness.el2.tcg.build) and Debian's source tarballs (harness.kernel.debian) are."""

import io
import tarfile

import pytest

from harness.el2.tcg.build import _extract_member
from harness.errors import InfraError
from harness.fsutil import take_tar_member


def archive(tmp_path, members: dict[str, bytes]):
    path = tmp_path / "a.tar.xz"
    with tarfile.open(path, "w:xz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_the_first_wanted_member_is_taken_whole(tmp_path):
    path = archive(tmp_path, {"q/x/h.h": b"no", "qemu-10/include/qemu/qemu-plugin.h": b"api" * 100000})
    with tarfile.open(path) as tar:
        assert take_tar_member(tar, lambda n: n.endswith("qemu-plugin.h"), tmp_path / "h")
    assert (tmp_path / "h").read_bytes() == b"api" * 100000
    assert not (tmp_path / "h.part").exists()


def test_a_missing_member_writes_nothing(tmp_path):
    path = archive(tmp_path, {"q/a": b"1"})
    with tarfile.open(path) as tar:
        assert not take_tar_member(tar, lambda n: n == "q/b", tmp_path / "b")
    assert list(tmp_path.iterdir()) == [path]


def test_the_plugin_header_comes_from_the_top_directory_only(tmp_path):
    path = archive(tmp_path, {"qemu/tests/include/qemu/qemu-plugin.h": b"wrong",
                              "qemu/include/qemu/qemu-plugin.h": b"right"})
    _extract_member(path, "include/qemu/qemu-plugin.h", tmp_path / "h")
    assert (tmp_path / "h").read_bytes() == b"right"
    with pytest.raises(InfraError, match="holds no include/nothing.h"):
        _extract_member(path, "include/nothing.h", tmp_path / "n")
