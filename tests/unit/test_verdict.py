"""The console verdict on golden logs captured from real boots of the 6.12 pKVM kernel
(tests/golden/*.log; see tests/golden/README.md for how each was made)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import ExitCode
from harness.image.initramfs import READY_MARKER
from harness.verdict import Outcome, clean, judge

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def golden(name: str) -> str:
    return (GOLDEN / name).read_text(errors="replace")


def test_hvhe_boot_passes():
    v = judge(golden("boot-max-hvhe.log"), ready_marker=READY_MARKER, expect_mode="hVHE")
    assert v.outcome is Outcome.PASS and v.pkvm_mode == "hVHE" and v.ready and v.events == []
    assert v.exit_code == ExitCode.PASS


def test_nvhe_boot_passes_and_mode_mismatch_fails():
    text = golden("boot-cortex-a72-nvhe.log")
    assert judge(text, ready_marker=READY_MARKER).pkvm_mode == "nVHE"
    v = judge(text, ready_marker=READY_MARKER, expect_mode="hVHE")
    assert v.outcome is Outcome.FAIL and "expected hVHE" in v.reason and v.exit_code == ExitCode.TEST_FAILURE


def test_el2_bug_is_a_panic_with_file_and_line_and_excerpt():
    v = judge(golden("el2-bug-host-reads-carveout.log"), ready_marker=READY_MARKER)
    assert v.outcome is Outcome.PANIC and v.exit_code == ExitCode.PANIC
    first = v.events[0]
    assert first.kind == "el2-bug" and "mem_protect.c" in first.line
    assert any("nVHE call trace" in line for line in first.excerpt)
    # 6.12 then oopses in the host while printing the EL2 trace, and panics: all are reported,
    # the EL2 BUG first, because it came first.
    assert [e.kind for e in v.events][:1] == ["el2-bug"] and {"oops", "kernel-panic"} <= {e.kind for e in v.events}
    assert v.reason.startswith("el2-bug at console line ")


def test_missing_init_is_a_kernel_panic():
    v = judge(golden("panic-no-init.log"), ready_marker=READY_MARKER)
    assert v.outcome is Outcome.PANIC and v.events[0].kind == "kernel-panic"
    assert not v.ready


def test_not_protected_is_a_failure_naming_pkvm():
    v = judge(golden("boot-not-protected.log"), ready_marker=READY_MARKER)
    assert v.outcome is Outcome.FAIL and v.pkvm_mode is None and "pKVM did not initialize" in v.reason


def test_timeout_takes_precedence_over_missing_marker_but_not_over_panic():
    text = golden("boot-max-hvhe.log")
    cut = text[: text.index("Protected hVHE")]
    v = judge(cut, ready_marker=READY_MARKER, timed_out=True)
    assert v.outcome is Outcome.TIMEOUT and v.exit_code == ExitCode.TIMEOUT
    assert "before the ready marker" in v.reason
    v = judge(golden("panic-no-init.log"), ready_marker=READY_MARKER, timed_out=True)
    assert v.outcome is Outcome.PANIC


@pytest.mark.parametrize("line,kind,outcome", [
    ("[    5.1] WARNING: CPU: 1 PID: 42 at arch/arm64/kvm/pkvm.c:123 foo+0x10/0x20", "warn", Outcome.FAIL),
    ("[    5.1] kvm [1]: Failed to init hyp memory protection", "pkvm-init-failed", Outcome.FAIL),
    ("[    5.1] Internal error: Oops: 0000000096000004 [#1] SMP", "oops", Outcome.PANIC),
    ("[    5.1] BUG: scheduling while atomic: swapper/0/1/0x00000002", "bug", Outcome.PANIC),
    ("[    5.1] kvm [1]: nVHE hyp panic at: [<ffff800080123456>] __kvm_nvhe_foo+0x40/0x80!", "el2-panic",
     Outcome.PANIC),
])
def test_each_failure_kind_is_recognised_inside_a_good_boot(line, kind, outcome):
    text = golden("boot-max-hvhe.log")
    at = text.index(READY_MARKER)
    v = judge(text[:at] + line + "\n" + text[at:], ready_marker=READY_MARKER)
    assert v.outcome is outcome and v.events[0].kind == kind
    assert line.strip() in v.events[0].excerpt
    assert v.events[0].line == line.strip()


def test_escape_codes_and_carriage_returns_are_stripped():
    assert clean("\x1b[0;32mok\x1b[0m\r\nnext\x1b(B") == ["ok", "next"]
