"""The initramfs index: a warm call extracts and hashes nothing; a changed input, or a damaged or
missing image, makes the image again (never serves a stale or corrupt one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.fsutil import sha256_file
from harness.image import debs, initramfs
from harness.image.payloads import Payloads

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")


def _deb(debs_dir: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    root = debs_dir.parent / f"pkgroot-{package}-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: arm64\nMaintainer: t <t@t>\nDescription: t\n")
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        (root / rel).chmod(0o755)
    out = debs_dir / f"{package}_{version}_arm64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(root), str(out)],
                   check=True, capture_output=True)
    shutil.rmtree(root)
    return out


class _Cache(type(Path())):
    """The cache directory, with the list of .debs extracted so far."""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    cache = _Cache(tmp_path / "cache")
    keys = cache / "keys"
    keys.mkdir(parents=True)
    (keys / "harness_ed25519").write_bytes(b"client private\n")
    (keys / "harness_ed25519.pub").write_text("ssh-ed25519 AAAAclient pkvm-harness\n")
    (keys / "dropbear_ed25519_host").write_bytes(b"host private")
    (keys / "dropbear_ed25519_host.pub").write_text("ssh-ed25519 AAAAhost\n")
    (cache / "debs").mkdir()
    _deb(cache / "debs", "busybox-static", "1.0", {"bin/busybox": b"\x7fELF busybox"})
    _deb(cache / "debs", "libfoo1", "2.0", {"lib/libfoo.so.1": b"\x7fELF libfoo"})
    pkgs = tmp_path / "packages.txt"
    pkgs.write_text("busybox-static bin/busybox\nlibfoo1 lib/libfoo.so.1\n")
    monkeypatch.setattr(debs, "PACKAGES_FILE", pkgs)
    calls = []
    real_extract = debs.extract

    def counting_extract(deb, members):
        calls.append(deb.name)
        return real_extract(deb, members)

    monkeypatch.setattr(debs, "extract", counting_extract)
    cache.extractions = calls
    return cache


def _payloads(tmp_path: Path, content: bytes = b"guest program") -> Payloads:
    bin_dir = tmp_path / "payloads" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "pkvm_guest").write_bytes(content)
    return Payloads(bin_dir)


def _check(img: initramfs.Initramfs) -> None:
    assert img.path.is_file()
    assert sha256_file(img.path) == img.sha256           # the reported digest is the content's
    assert img.path.name == f"{img.sha256[:24]}.cpio"


def test_warm_call_uses_the_index(cache):
    first = initramfs.build_initramfs(cache)
    _check(first)
    assert len(cache.extractions) == 2
    assert first.packages == ("busybox-static_1.0_arm64.deb", "libfoo1_2.0_arm64.deb")
    again = initramfs.build_initramfs(cache)
    assert again == first
    assert len(cache.extractions) == 2                     # nothing extracted again
    assert len(list((cache / "initramfs" / "index").glob("*.json"))) == 1


def test_warm_call_neither_extracts_nor_hashes(cache, monkeypatch):
    initramfs.build_initramfs(cache)

    def boom(*a, **k):
        raise AssertionError("a warm call must not do this")

    monkeypatch.setattr(initramfs, "sha256_file", boom)
    monkeypatch.setattr(initramfs.cpio, "write_newc", boom)
    monkeypatch.setattr(debs, "extract", boom)
    monkeypatch.setattr(debs, "fetch_deb", boom)
    _check(initramfs.build_initramfs(cache))


def test_a_changed_payload_makes_a_new_image(cache, tmp_path):
    with_payloads = initramfs.build_initramfs(cache, _payloads(tmp_path))
    _check(with_payloads)
    assert len(cache.extractions) == 2
    same = Payloads(tmp_path / "payloads" / "bin")
    assert initramfs.build_initramfs(cache, same) == with_payloads
    assert len(cache.extractions) == 2                   # unchanged: from the index
    changed = initramfs.build_initramfs(cache, _payloads(tmp_path, b"another guest program"))
    _check(changed)
    assert changed.sha256 != with_payloads.sha256
    assert len(cache.extractions) == 4
    plain = initramfs.build_initramfs(cache)
    _check(plain)
    assert plain.sha256 not in (changed.sha256, with_payloads.sha256)


def test_a_changed_package_list_or_deb_makes_a_new_image(cache, tmp_path):
    first = initramfs.build_initramfs(cache)
    debs.PACKAGES_FILE.write_text("busybox-static bin/busybox\n")
    fewer = initramfs.build_initramfs(cache)
    _check(fewer)
    assert fewer.sha256 != first.sha256 and fewer.packages == ("busybox-static_1.0_arm64.deb",)
    assert len(cache.extractions) == 3
    # A newer version of a package in the cache replaces the old one in the image.
    _deb(cache / "debs", "busybox-static", "1.1", {"bin/busybox": b"\x7fELF busybox 1.1"})
    newer = initramfs.build_initramfs(cache)
    _check(newer)
    assert newer.packages == ("busybox-static_1.1_arm64.deb",) and newer.sha256 != fewer.sha256
    # The same .deb name written again (new mtime) is an input change too.
    deb = cache / "debs" / "busybox-static_1.1_arm64.deb"
    st = deb.stat()
    os.utime(deb, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    n = len(cache.extractions)
    assert initramfs.build_initramfs(cache) == newer
    assert len(cache.extractions) == n + 1


def test_a_changed_key_makes_a_new_image(cache):
    first = initramfs.build_initramfs(cache)
    (cache / "keys" / "harness_ed25519.pub").write_text("ssh-ed25519 AAAAother pkvm-harness\n")
    second = initramfs.build_initramfs(cache)
    _check(second)
    assert second.sha256 != first.sha256


@pytest.mark.parametrize("damage", ["truncate", "same-size", "delete", "index"])
def test_a_damaged_or_missing_image_is_made_again(cache, damage):
    good = initramfs.build_initramfs(cache)
    good_bytes = good.path.read_bytes()
    if damage == "truncate":
        good.path.write_bytes(good_bytes[:100])
    elif damage == "same-size":
        st = good.path.stat()
        with open(good.path, "r+b") as f:            # flip bytes in place, size unchanged
            f.seek(len(good_bytes) // 2)
            f.write(b"\xff\xff\xff\xff")
        os.utime(good.path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))   # however close in time
    elif damage == "delete":
        good.path.unlink()
    else:
        index = next((cache / "initramfs" / "index").glob("*.json"))
        index.write_text(json.dumps({"file": good.path.name}))            # a record cut short
    n = len(cache.extractions)
    again = initramfs.build_initramfs(cache)
    assert len(cache.extractions) == n + 2                # made again, not served
    assert again.sha256 == good.sha256 and again.path.read_bytes() == good_bytes
    _check(again)
    assert initramfs.build_initramfs(cache) == again      # and indexed again
    assert len(cache.extractions) == n + 2


def test_a_record_pointing_at_another_file_is_not_served(cache):
    good = initramfs.build_initramfs(cache)
    index = next((cache / "initramfs" / "index").glob("*.json"))
    rec = json.loads(index.read_text())
    rec["sha256"] = "0" * 64                             # the file name no longer matches the digest
    index.write_text(json.dumps(rec))
    again = initramfs.build_initramfs(cache)
    assert again.sha256 == good.sha256
    _check(again)
