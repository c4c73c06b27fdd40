"""The hostile host's model (harness.model.hostile): what each misused hypercall must return, the
seeded mixes, and the shrinking of a failing one; and the overlay that puts the hostile host's
code into a test kernel only (harness.kernel.overlays)."""

from __future__ import annotations

import subprocess

from harness.kernel.config import ConfigOption
from harness.kernel.overlays import HOSTILE_HOST, patches_for
from harness.kernel.source import added_symbols, patched_files
from harness.kernel.version import KernelVersion
from harness.model.errnos import EBUSY, EPERM
from harness.model.hostile import SHARE, UNSHARE, VM, MixModel, Step, mix, predict, shrink
from harness.model.stage2 import State

OWNED, NOPAGE, SO, SB = State.OWNED, State.NOPAGE, State.SHARED_OWNED, State.SHARED_BORROWED

V6_12 = KernelVersion.parse("6.12.117")


def test_a_share_is_refused_unless_the_host_owns_the_page_and_the_hyp_has_none():
    assert predict("host_share_hyp", (OWNED, NOPAGE)) == 0
    assert predict("host_share_hyp", (SO, SB)) == EPERM             # shared twice
    assert predict("host_share_hyp", (NOPAGE, OWNED)) == EPERM      # the hyp's own page
    assert predict("host_share_hyp", (OWNED, NOPAGE), is_memory=False) == EPERM    # MMIO


def test_an_unshare_is_refused_unless_shared_and_busy_while_pinned():
    assert predict("host_unshare_hyp", (OWNED, NOPAGE)) == EPERM
    assert predict("host_unshare_hyp", (SO, SB)) == 0
    assert predict("host_unshare_hyp", (SO, SB), pins=1) == EBUSY


def test_a_mix_is_the_same_for_a_seed_and_has_every_kind_of_step():
    assert mix(7) == mix(7) and mix(7) != mix(8)
    ops = {s.op for seed in range(5) for s in mix(seed)}
    assert ops == {SHARE, UNSHARE, VM}


def test_the_mix_model_follows_shares_and_refuses_what_is_wrong():
    m = MixModel()
    assert [m.apply(Step(op, 0)) for op in (SHARE, SHARE, UNSHARE, UNSHARE)] == [0, EPERM, 0, EPERM]
    assert m.apply(Step(SHARE, 1)) == 0 and m.shared() == [1]


def test_shrinking_finds_the_shortest_failing_subsequence():
    steps = [Step(SHARE, i % 3) for i in range(20)] + [Step(UNSHARE, 9)] + [Step(VM, 1)] * 5
    calls = []

    def fails(cand: list[Step]) -> bool:
        calls.append(len(cand))
        return Step(UNSHARE, 9) in cand and Step(SHARE, 2) in cand

    short = shrink(steps, fails)
    assert sorted(short, key=str) == sorted([Step(SHARE, 2), Step(UNSHARE, 9)], key=str)
    assert len(calls) <= 64


def test_the_overlay_is_added_only_when_its_symbol_is_asked_for(tmp_path):
    tree = tmp_path / "linux"
    (tree / HOSTILE_HOST.kconfig_dir).mkdir(parents=True)
    (tree / HOSTILE_HOST.kconfig_dir / "Kconfig").write_text("config KVM\n\tbool \"KVM\"\n")
    (tree / HOSTILE_HOST.kconfig_dir / "Makefile").write_text("obj-$(CONFIG_KVM) += kvm.o\n")
    assert patches_for({}, tree, tmp_path / "cache", V6_12) == []
    asked = {"PKVM_HOSTILE_HOST": ConfigOption("PKVM_HOSTILE_HOST", "y", "a fragment")}
    [patch] = patches_for(asked, tree, tmp_path / "cache", V6_12)
    assert patches_for(asked, tree, tmp_path / "cache", V6_12) == [patch]           # cached by content
    assert added_symbols(patch) == ["PKVM_HOSTILE_HOST"]
    assert set(patched_files(patch)) == {f"{HOSTILE_HOST.kconfig_dir}/{n}" for n in ("Kconfig", "Makefile",
                                                                                   "pkvm_hostile.c")}
    r = subprocess.run(["patch", "-p1", "--batch", "-d", str(tree), "-i", str(patch)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    where = tree / HOSTILE_HOST.kconfig_dir
    assert "obj-$(CONFIG_PKVM_HOSTILE_HOST) += pkvm_hostile.o" in (where / "Makefile").read_text()
    assert "debugfs_create_dir(\"pkvm_hostile\"" in (where / "pkvm_hostile.c").read_text()
