"""A suite whose tests pass but leave trouble behind, so tests/integration/test_el2_clean_after.py
sees `el2_clean_after` fail each at its teardown: a WARN in the kernel log, and a broken
invariant. Not collected by `pytest tests` (its name does not start with test_)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _clean(el2_clean_after):
    yield


def test_a_quiet_test_stays_green(target):
    assert target.run("true").ok


def test_a_warn_logged_during_the_test_fails_it(target):
    target.run("echo 'WARNING: CPU: 1 PID: 42 at arch/arm64/kvm/hyp/nvhe/mem_protect.c:99 on purpose' "
               "> /dev/kmsg").check()


def test_an_invariant_broken_after_the_test_fails_it(target, el2):
    """The host cannot corrupt EL2 memory on purpose, so the snapshot the check takes is made to
    hold a free block with a stale byte (the check reads the same Pool.dirty_free a real one would).
    Not monkeypatch: its undo would run before the check (fixtures end in reverse order); this is
    the session's last test."""
    real = el2.snapshot

    def dirty_snapshot(*args, **kwargs):
        snap = real(*args, **kwargs)
        pool = snap.pools["hpool"]
        pool.dirty_free = [(pool.free_lists[max(k for k, v in pool.free_lists.items() if v)][0], 0, 0x40)]
        return snap

    el2.snapshot = dirty_snapshot
