"""Boot suite: pKVM came up, in the mode expected, with a clean log and the hyp memory that
kvm_hyp_reserve() should have reserved for this machine's memory."""

from __future__ import annotations

import re

import pytest

from harness.model.sizing import hyp_reserve
from harness.verdict import clean, scan

RESERVED_RE = re.compile(r"kvm \[\d+\]: Reserved (\d+) MiB at (0x[0-9a-f]+)")
HYP_TROUBLE_RE = re.compile(r"\bhyp\b.*\b(error|fail|failed|panic|BUG|corrupt)", re.IGNORECASE)


def test_pkvm_is_up_in_the_expected_mode(target, expected_pkvm_mode):
    assert re.search(r"(^|\s)kvm-arm\.mode=protected(\s|$)", target.run("cat /proc/cmdline").check().stdout)
    mode = target.pkvm_mode()
    assert mode is not None, "no 'Protected ... mode initialized successfully' in dmesg"
    if expected_pkvm_mode:
        assert mode == expected_pkvm_mode
    else:
        assert mode in ("nVHE", "hVHE")


def test_dmesg_has_no_warning_bug_or_hyp_trouble(target):
    lines = clean(target.dmesg())
    events = scan(lines)
    assert events == [], "\n".join(f"{e.kind}: {e.line}" for e in events)
    trouble = [line for line in lines if HYP_TROUBLE_RE.search(line)]
    assert trouble == []


@pytest.mark.needs_el2
def test_reserved_hyp_memory_is_what_kvm_hyp_reserve_computes(target, el2):
    m = RESERVED_RE.search(target.dmesg())
    assert m, "no 'kvm [N]: Reserved N MiB at 0x...' line in dmesg"
    snap = el2.snapshot()
    want = hyp_reserve([(base, size) for base, size, _ in snap.memblocks], el2.kernel.kernel_version,
                       el2.kernel.struct("hyp_page").size)
    assert (int(m.group(1)), int(m.group(2), 16)) == (want.mib, snap.carveout[0]), \
        f"model: {want.pages} pages = {want} -> {want.mib} MiB"
    assert snap.carveout[1] == want.bytes
