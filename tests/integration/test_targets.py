"""Targets against real parts: the smoke suite over the console and over SSH (real dropbear,
real paramiko), and the SSH bad-input cases against the guest's real SSH server."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import paramiko
import pytest

from harness.image.keys import ensure_keys
from harness.image.payloads import selftest_lines
from harness.targets.base import TargetError
from harness.targets.ssh import SshParams, SshTarget
from tests.integration.conftest import assembled, qemu_pids_mentioning

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("transport,cpu", [("console", "max"), ("ssh", "cortex-a72")])
def test_smoke_suite_runs_unchanged_on_each_transport(kernel, tmp_path, transport, cpu):
    r = subprocess.run([sys.executable, "-m", "pytest", str(REPO / "test_suites/smoke"), "-q",
                        "-p", "no:cacheprovider", "--pkvm-transport", transport, "--pkvm-cpu", cpu,
                        "--pkvm-run-dir", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "10 passed" in r.stdout
    assert (tmp_path / "console.log").is_file()
    assert not qemu_pids_mentioning(str(tmp_path))


def _guest(cache_dir, kernel, run_dir: Path, append: list[str] | None = None, no_reboot: bool = True):
    machine = assembled(cache_dir, run_dir, append=append or [])
    return replace(machine, spec=replace(machine.spec, no_reboot=no_reboot)).start(run_dir, "ssh")


@pytest.fixture(scope="module")
def guest(cache_dir, kernel, tmp_path_factory):
    """A pKVM host under QEMU that may reboot (no -no-reboot), reached over SSH as a board would be."""
    t = _guest(cache_dir, kernel, tmp_path_factory.mktemp("guest"), no_reboot=False)
    yield t
    t.close()


def _known_hosts(path: Path, port: int, key_line: str) -> Path:
    path.write_text(f"[127.0.0.1]:{port} {key_line}\n")
    return path


def _params(guest, cache_dir, **kw) -> SshParams:
    return SshParams(host="127.0.0.1", port=guest.spec.ssh_port, user="root",
                     key=ensure_keys(cache_dir).client_private, **kw)


def test_board_target_checks_pkvm_runs_and_reconnects_after_reboot(guest, cache_dir, tmp_path):
    kh = _known_hosts(tmp_path / "known_hosts", guest.spec.ssh_port, ensure_keys(cache_dir).host_public_line)
    board = SshTarget(_params(guest, cache_dir, known_hosts=kh), reboot_command="reboot -f")   # PID 1 is sh
    try:
        assert board.mode == "hVHE"
        boot_id = board.run("cat /proc/sys/kernel/random/boot_id").check().stdout
        board.reboot(timeout=120)
        assert board.run("cat /proc/sys/kernel/random/boot_id").check().stdout != boot_id
        assert board.mode == "hVHE"                        # checked again after the reboot
    finally:
        board.close()


def test_smoke_suite_as_a_board_run(guest, cache_dir, tmp_path):
    """The board path end to end: --target ssh://, strict known_hosts, payloads uploaded on
    first use (the guest's dropbear stands in for a board's sshd)."""
    kh = _known_hosts(tmp_path / "known_hosts", guest.spec.ssh_port, ensure_keys(cache_dir).host_public_line)
    guest.run("rm -rf /tmp/pkvm-harness").check()
    r = subprocess.run([sys.executable, "-m", "pytest", str(REPO / "test_suites/smoke"), "-q", "-rs",
                        "-p", "no:cacheprovider", "--pkvm-target", f"ssh://root@127.0.0.1:{guest.spec.ssh_port}",
                        "--pkvm-ssh-key", str(ensure_keys(cache_dir).client_private), "--pkvm-ssh-known-hosts", str(kh),
                        "--pkvm-run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "8 passed, 2 skipped" in r.stdout                 # needs_qemu, and needs_el2 without a dump kernel, skip
    uploaded = guest.run("ls /tmp/pkvm-harness/bin /tmp/pkvm-harness/bin/kvm-selftests").check().stdout
    assert "kvm_caps" in uploaded and "kvm_create_max_vcpus" in uploaded


def test_the_serial_console_is_read_while_commands_go_over_ssh(guest):
    """Over SSH nothing else reads the serial console: unread, a full pty would stall the guest's
    printk. 3,000 kernel lines (about 100 KB) must all reach the console log."""
    guest.run("for i in $(seq 3000); do echo pkvm-pump-$i > /dev/kmsg; done", timeout=120).check()
    deadline = time.monotonic() + 20
    while "pkvm-pump-3000" not in guest.console_text():
        assert time.monotonic() < deadline, guest.console_text()[-500:]
        time.sleep(0.2)
    assert guest.console_text().count("pkvm-pump-") >= 3000


def test_nightly_suites_as_a_board_run(guest, cache_dir, tmp_path):
    """On a board the suites that need no EL2 access run (boot, kvm_selftests with their KTAP
    subtests); the EL2 ones (allocator, stage2, the sizing check) skip, each with its reason."""
    kh = _known_hosts(tmp_path / "known_hosts", guest.spec.ssh_port, ensure_keys(cache_dir).host_public_line)
    r = subprocess.run([sys.executable, "-m", "pytest", *[str(REPO / "test_suites" / s) for s in
                                                         ("boot", "allocator", "stage2", "kvm_selftests")],
                        "-q", "-rs", "-p", "no:cacheprovider", "--pkvm-target", f"ssh://root@127.0.0.1:{guest.spec.ssh_port}",
                        "--pkvm-ssh-key", str(ensure_keys(cache_dir).client_private), "--pkvm-ssh-known-hosts", str(kh),
                        "--pkvm-run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    summary = r.stdout.strip().splitlines()[-1]
    passed, skipped = (int(re.search(rf"(\d+) {w}", summary).group(1)) for w in ("passed", "skipped"))
    assert passed >= 2 + len([t for t in selftest_lines() if t.kernels is None]) and skipped >= 1 + 6 + 5, summary
    assert "subtests passed" in summary                     # KTAP selftests report per subtest
    assert "EL2 memory cannot be read on board" in r.stdout and "has no EL2 dump" in r.stdout


def test_unknown_host_key_is_refused_unless_accepted(guest, cache_dir, tmp_path):
    kh = tmp_path / "known_hosts"
    with pytest.raises(TargetError, match="is not in .*known_hosts") as e:
        SshTarget(_params(guest, cache_dir, known_hosts=kh))
    assert "--pkvm-ssh-accept-new-host-key" in e.value.hint
    SshTarget(_params(guest, cache_dir, known_hosts=kh, accept_new_host_key=True)).close()
    saved = kh.read_text()
    assert f"[127.0.0.1]:{guest.spec.ssh_port}" in saved
    assert ensure_keys(cache_dir).host_public_line.split()[1] in saved
    SshTarget(_params(guest, cache_dir, known_hosts=kh)).close()      # now known: strict mode works


def test_changed_host_key_is_refused_unless_accepted(guest, cache_dir, tmp_path):
    impostor = paramiko.Ed25519Key.from_private_key_file(str(ensure_keys(cache_dir).client_private))
    kh = _known_hosts(tmp_path / "known_hosts", guest.spec.ssh_port,
                      f"{impostor.get_name()} {impostor.get_base64()}")
    with pytest.raises(TargetError, match="host key .* changed"):
        SshTarget(_params(guest, cache_dir, known_hosts=kh))
    assert impostor.get_base64() in kh.read_text()                   # a refusal changes nothing
    SshTarget(_params(guest, cache_dir, known_hosts=kh, accept_new_host_key=True)).close()
    assert impostor.get_base64() not in kh.read_text()


def test_refused_key_is_reported(guest, cache_dir, tmp_path):
    stranger = tmp_path / "stranger"
    paramiko.ECDSAKey.generate().write_private_key_file(str(stranger))
    kh = _known_hosts(tmp_path / "known_hosts", guest.spec.ssh_port, ensure_keys(cache_dir).host_public_line)
    start = time.monotonic()
    with pytest.raises(TargetError, match="refused the key"):
        SshTarget(replace(_params(guest, cache_dir, known_hosts=kh), key=stranger))
    assert time.monotonic() - start < 15


def test_unreachable_hosts_fail_within_the_deadline(tmp_path):
    with socket.socket() as s:                         # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(TargetError, match="cannot reach"):
        SshTarget(SshParams(host="127.0.0.1", port=closed, connect_timeout=3))
    assert time.monotonic() - start < 5

    # A peer that accepts but never speaks SSH (a hung sshd, a wrong port behind a firewall).
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(silent.accept()[0]), daemon=True).start()
    start = time.monotonic()
    with pytest.raises(TargetError):
        SshTarget(SshParams(host="127.0.0.1", port=silent.getsockname()[1], connect_timeout=3))
    assert time.monotonic() - start < 10
    for s in [silent, *held]:
        s.close()


def test_a_machine_without_pkvm_is_refused(cache_dir, kernel, tmp_path):
    t = _guest(cache_dir, kernel, tmp_path, append=["kvm-arm.mode=nvhe"])
    try:
        assert t.mode is None
        kh = _known_hosts(tmp_path / "known_hosts", t.spec.ssh_port, ensure_keys(cache_dir).host_public_line)
        with pytest.raises(TargetError, match="does not run pKVM: its kernel command line has kvm-arm.mode=nvhe"):
            SshTarget(_params(t, cache_dir, known_hosts=kh))
    finally:
        t.close()
    assert not qemu_pids_mentioning(str(tmp_path))


@pytest.mark.parametrize("transport", ["console", "ssh"])
def test_a_command_that_panics_the_host_names_the_panic(cache_dir, kernel, tmp_path, transport):
    """The host reads the hyp carveout: EL2 BUG()s, the host panics. The command's error must be
    the panic (the panic exit code, its console line), not a bare timeout."""
    from harness.errors import ExitCode
    from harness.targets.base import TargetPanicked

    with assembled(cache_dir, tmp_path).start(tmp_path, transport) as t:
        base = int(t.run("dmesg | sed -n 's/.*Reserved [0-9]* MiB at \\(0x[0-9a-f]*\\).*/\\1/p'").check().stdout, 16)
        with pytest.raises(TargetPanicked, match=r"nVHE hyp BUG at: arch/arm64/kvm/hyp/nvhe/mem_protect\.c") as e:
            t.run(f"devmem {base:#x} 64", timeout=20)
        assert e.value.exit_code == ExitCode.PANIC
    assert not qemu_pids_mentioning(str(tmp_path))
