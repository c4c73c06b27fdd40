"""A suite whose target dies in its second test: the host reads the hyp carveout, EL2 BUG()s in
handle_host_mem_abort and the host panics. The test it died in must fail once, with the panic
line; the tests after it must be reported as not run because the target died, not as failures
of their own. Run in a child pytest by tests/integration/test_dead_target.py (its name does not
start with test_, so `pytest tests` does not collect it)."""

from __future__ import annotations

import re


def test_before_it_dies(target, el2):
    assert target.mode in ("nVHE", "hVHE") and el2.snapshot().pools


def test_reads_the_hyp_carveout(target):
    base = re.search(r"Reserved \d+ MiB at (0x[0-9a-f]+)", target.dmesg())
    assert base, "no hyp carveout line in dmesg"
    target.run(f"devmem {base.group(1)} 64", timeout=30)


def test_after_it_died(target):
    target.run("true").check()


def test_reads_el2_after_it_died(target, el2):
    assert el2.snapshot().pools
