"""The mutant catalogue is well formed: at least six per kernel, each a one-file EL2 change with
a bug description, the kernels it is written for and a compilable Expect pattern."""

import re

from harness.junit import failures
from harness.kernel.source import patched_files
from tests.mutants.mutants import catalogue, every_patch

EL2 = "arch/arm64/kvm/hyp/"          # nvhe/, and pgtable.c, which nvhe/ builds for EL2 too


def test_six_or_more_mutants_each_touching_el2_memory_code():
    mutants = catalogue()
    assert len(mutants) >= 6
    assert len({m.name for m in mutants}) == len(mutants)
    for m in every_patch():
        files = patched_files(m.path)
        assert files and all(f.startswith(EL2) for f in files), (m.name, files)
        assert len(m.bug) > 40 and isinstance(m.expect, re.Pattern)


def test_junit_failures_are_read_with_their_messages(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="test_suites.stage2.test_stage2" name="test_a">'
                   '<failure message="AssertionError: model level 2, kernel level 3">trace</failure></testcase>'
                   '<testcase classname="test_suites.boot.test_boot" name="test_b"/></testsuite></testsuites>')
    failed, total = failures(xml)
    assert total == 2 and [f.test for f in failed] == ["stage2/test_stage2::test_a"]
    assert "model level 2" in failed[0].message and "trace" in failed[0].message


def test_7_x_has_the_ported_mutants_and_ones_in_code_that_exists_only_since_6_14():
    old, new = {m.name: m for m in catalogue("6.12")}, {m.name: m for m in catalogue("7.3")}
    # every 6.12 mutant is ported, but those in code 6.14 rewrote (their range ends before 7.x)
    assert set(old) - set(new) == {name for name, m in old.items() if re.search(r"-6\.\d+$", m.kernels)}
    assert len(set(new) - set(old)) >= 2
    assert old["05-host-abort-block-size"].path != new["05-host-abort-block-size"].path
    assert {m.kernels for name, m in new.items() if name not in old} == {"7.2+", "7.3+"}
    assert [m.name for m in catalogue("7.2")] == [n for n, m in new.items() if m.kernels != "7.3+"]


def test_error_path_mutants_name_the_sweep_that_must_catch_them():
    swept = [m for m in every_patch() if m.sweep]
    assert len(swept) >= 2
    assert all(m.sweep in ("lifecycle", "random") for m in swept)
