"""KTAP/TAP parsing on output recorded from the 6.12 KVM selftests under pKVM (steal_time,
set_id_regs, which dies on an assertion after its 56th test)."""

from harness.ktap import outcome_of_status, parse

STEAL_TIME = """Random seed: 0x6b8b4567
TAP version 13
1..4
ok 1 vcpu0
ok 2 vcpu1
ok 3 vcpu2
ok 4 vcpu3
# Totals: pass:4 fail:0 xfail:0 xpass:0 skip:0 error:0
"""

SET_ID_REGS_ABORTED = """Random seed: 0x6b8b4567
TAP version 13
1..3
ok 1 ID_AA64DFR0_EL1_PMUVer
ok 2 ID_AA64ISAR0_EL1_SM4
==== Test Assertion Failure ====
  aarch64/set_id_regs.c:434: masks[idx] & ftr_bits[j].mask == ftr_bits[j].mask
"""


def test_a_clean_run():
    r = parse(STEAL_TIME)
    assert r.is_tap and r.plan == 4 and [t.name for t in r.results] == ["vcpu0", "vcpu1", "vcpu2", "vcpu3"]
    assert {t.outcome for t in r.results} == {"pass"} and r.problems() == []


def test_a_run_that_dies_midway_reports_the_missing_tests():
    r = parse(SET_ID_REGS_ABORTED)
    assert len(r.results) == 2 and r.problems() == ["planned 3 tests, reported 2"]


def test_directives_nesting_and_bail_out():
    r = parse("KTAP version 1\n1..4\n    ok 1 nested, ignored\nok 1 a # SKIP no GICv3\nnot ok 2 - b\n"
              "not ok 3 c # TODO later\nok 4 d\nBail out! out of memory\n")
    assert [(t.number, t.name, t.outcome, t.reason) for t in r.results] == [
        (1, "a", "skip", "no GICv3"), (2, "b", "fail", ""), (3, "c", "pass", "later"), (4, "d", "pass", "")]
    assert r.problems() == ["bailed out: out of memory"]


def test_output_without_tap_is_judged_by_exit_status():
    assert not parse("Random seed: 0x1\nTesting creating 512 vCPUs\n").is_tap
    assert (outcome_of_status(0), outcome_of_status(4), outcome_of_status(254)) == ("pass", "skip", "fail")
