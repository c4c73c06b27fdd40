"""`--kernel-build DIR`: a developer's own O= build directory is used as it is, and refused, with
the reason, when it is not a build directory or its .config lacks pKVM's options."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.kernel import config as kconfig
from harness.kernel import prebuilt
from tests.unit.test_cache_key import _linux_tree

HARNESS = [sys.executable, "-m", "harness"]


def _o_dir(tmp_path, drop: str | None = None):
    src = _linux_tree(tmp_path / "linux")
    out = tmp_path / "o"
    (out / "arch/arm64/boot").mkdir(parents=True)
    for rel in ("arch/arm64/boot/Image", "vmlinux", "System.map"):
        (out / rel).write_bytes(b"\0")
    (out / "source").symlink_to(src)
    wanted = kconfig.merge([], [], version="6.12.117")
    (out / ".config").write_text("".join(f"{o.line()}\n" for o in wanted.values() if o.name != drop))
    return out


def _refused(*args: str, cache) -> str:
    r = subprocess.run([*HARNESS, "build", *args, "--cache-dir", str(cache)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    (line,) = r.stderr.strip().splitlines()
    return line


def test_a_build_with_pkvms_options_is_used_in_place(tmp_path):
    out = _o_dir(tmp_path)
    assert prebuilt.check_config(out, "6.12.117")
    k = prebuilt.use(out, tmp_path / "cache", "6.12.117")
    assert k.image.resolve() == (out / "arch/arm64/boot/Image").resolve() and k.meta["source"] == f"prebuilt:{out}"
    assert prebuilt.use(out, tmp_path / "cache", "6.12.117").reused
    (out / "vmlinux").write_bytes(b"rebuilt")          # a rebuild in DIR is a new kernel
    assert not prebuilt.use(out, tmp_path / "cache", "6.12.117").reused


def test_a_config_without_pkvm_is_refused_naming_the_option(tmp_path):
    line = _refused("--kernel-build", str(_o_dir(tmp_path, drop="KVM")), cache=tmp_path / "c")
    assert "lacks pKVM's CONFIG_KVM=y" in line and "pkvm.config" in line


@pytest.mark.parametrize("what, says", [
    ("missing", "is not a directory"),
    ("no-image", "has no arch/arm64/boot/Image"),
    ("in-tree", "is not an O= build directory"),
])
def test_what_is_not_a_build_directory_is_refused(tmp_path, what, says):
    out = _o_dir(tmp_path)
    if what == "missing":
        out = tmp_path / "nope"
    elif what == "no-image":
        (out / "arch/arm64/boot/Image").unlink()
    else:
        (out / "source").unlink()
    assert says in _refused("--kernel-build", str(out), cache=tmp_path / "c")


def test_patches_do_not_apply_to_your_own_build(tmp_path):
    line = _refused("--kernel-build", str(_o_dir(tmp_path)), "--kconfig", "CONFIG_X=y", cache=tmp_path / "c")
    assert "--kernel-build uses your kernel as it is" in line
