"""Upstream KVM selftests, built from the kernel tree under test (rootfs/kvm-selftests.txt lists
them with arguments sized for TCG). A test that prints TAP/KTAP gives one pytest result per
subtest; one that prints none is judged by its kselftest exit status (0 pass, 4 skip)."""

from __future__ import annotations

import pytest

from harness import ktap
from harness.image.payloads import GUEST_MODES, resolve_guest_modes, selftest_lines

SELFTESTS = selftest_lines()


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.fixture(scope="module")
def guest_modes(target, payload) -> list[str]:
    """This kernel's guest mode names in enum order (written by the payload build)."""
    return target.run(f"cat {payload(GUEST_MODES)}").check().stdout.split()


@pytest.mark.parametrize("test", SELFTESTS, ids=[t.name for t in SELFTESTS])
def test_kvm_selftest(request, target, payload, subtests, guest_modes, kernel_version, test):
    if not test.runs_on(kernel_version):
        pytest.skip(f"not run on Linux {kernel_version}: rootfs/kvm-selftests.txt lists it for {test.kernels}")
    if test.fails_on(kernel_version):
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"{test.name} is expected to fail on Linux "
                                              f"{kernel_version} (rootfs/kvm-selftests.txt says why)"))
    name, args = test.name, resolve_guest_modes(test.args, guest_modes)
    r = target.run(f"{payload('kvm-selftests/' + name)} {args} 2>&1", timeout=600)
    report = ktap.parse(r.stdout)
    if not report.is_tap:
        outcome = ktap.outcome_of_status(r.status)
        if outcome == "skip":
            pytest.skip(f"{name} skipped itself: {_tail(r.stdout, 3)}")
        assert outcome == "pass", f"{name} {args} exited {r.status}:\n{_tail(r.stdout)}"
        return
    for result in report.results:
        with subtests.test(msg=f"{result.number} {result.name}"):
            if result.outcome == "skip":
                pytest.skip(result.reason or "skipped by the test")
            assert result.outcome == "pass", f"not ok {result.number} {result.name}"
    assert report.problems() == [], f"{name}: {report.problems()}\n{_tail(r.stdout)}"
    assert ktap.outcome_of_status(r.status) != "fail", f"{name} exited {r.status}:\n{_tail(r.stdout)}"
