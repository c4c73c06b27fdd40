"""Smoke suite: the Target contract, on whatever target the plugin gives (QEMU or a board)."""

from __future__ import annotations

import hashlib
import os
import secrets

import pytest

from harness.targets.base import CommandTimeout


def test_command_exit_status_and_stderr(target):
    r = target.run("echo out; echo err >&2; exit 7")
    assert (r.status, r.stdout, r.stderr) == (7, "out\n", "err\n")
    assert target.run("true").ok and not target.run("false").ok


def test_megabyte_output_arrives_whole(target):
    r = target.run("seq 1 150000", timeout=180)           # 1.0 MB
    assert r.ok
    assert r.stdout.splitlines() == [str(i) for i in range(1, 150001)]


def test_binary_file_round_trip(target, tmp_path):
    data = os.urandom(24 * 1024) + bytes(range(256)) * 8
    src = tmp_path / "blob"
    src.write_bytes(data)
    remote = f"/tmp/pkvm-smoke-{secrets.token_hex(3)}.bin"
    target.put(src, remote)
    assert target.run(f"sha256sum {remote}").check().stdout.split()[0] == hashlib.sha256(data).hexdigest()
    target.get(remote, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data
    target.run(f"rm -f {remote}")


def test_dmesg_since_a_mark(target):
    mark = target.dmesg_mark()
    tag = f"pkvm-harness-smoke-{secrets.token_hex(4)}"
    target.run(f"echo {tag} > /dev/kmsg").check()
    since = target.dmesg(mark)
    assert tag in since
    assert "Booting Linux" not in since          # what came before the mark is left out
    assert tag in target.dmesg() and "Booting Linux" in target.dmesg()


def test_pkvm_is_up_in_protected_mode(target):
    assert "kvm-arm.mode=protected" in target.run("cat /proc/cmdline").stdout
    mode = target.pkvm_mode()
    assert mode in ("nVHE", "hVHE")
    cpu = getattr(getattr(target, "spec", None), "cpu", None)
    if cpu == "cortex-a72":                       # no VHE in the CPU: nVHE
        assert mode == "nVHE"


def test_harness_payload_creates_a_vm(target, payload):
    r = target.run(payload("kvm_caps"), timeout=60)
    kv = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert r.status == 0, r.stdout + r.stderr
    assert kv["api_version"] == "12" and kv["create_vm"] == "ok" and kv["create_vcpu"] == "ok"
    assert int(kv["ipa_size"]) >= 40 and int(kv["max_vcpus"]) >= 1


def test_kvm_selftest_runs_to_completion(target, payload):
    r = target.run(payload("kvm-selftests/kvm_create_max_vcpus"), timeout=300)
    assert r.status == 0, r.stdout + r.stderr
    assert "KVM_CAP_MAX_VCPU" in r.stdout


def test_a_hung_command_times_out_and_the_target_survives(target):
    with pytest.raises(CommandTimeout) as e:
        target.run("sleep 600", timeout=3)
    assert e.value.target_alive
    assert target.run("echo back").stdout == "back\n"


@pytest.mark.needs_el2
def test_physical_reads_see_the_running_kernel(target, el2):
    banner = el2.mem.read(el2.kpa("linux_banner"), 256).split(b"\0")[0].decode()
    assert banner.strip() == target.run("cat /proc/version").check().stdout.strip()


@pytest.mark.needs_qemu
def test_console_has_no_warning_oops_or_panic(target):
    v = target.verdict()
    assert v.events == [], v.reason
