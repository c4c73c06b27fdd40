"""Fetching a newer Debian kernel source (7.2 from sid) into a cache of its own, as `--kernel 7.2`
does on first use: through a private apt state, leaving the system's apt lists as they were."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from harness.errors import InfraError
from harness.kernel import debian

SYSTEM_LISTS = Path("/var/lib/apt/lists")


def _listing(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in d.iterdir()}


@pytest.mark.slow
def test_a_newer_series_is_fetched_once_and_the_system_apt_state_is_untouched(tmp_path):
    before = _listing(SYSTEM_LISTS)
    path = debian.tarball("7.2", tmp_path, quiet=True)
    assert path == debian.SOURCES["7.2"].tarball(tmp_path) and path.stat().st_size > 100 << 20
    with tarfile.open(path) as tar:            # a kernel tree, with its top-level Makefile
        assert any(m.name.removeprefix("./") == "linux-source-7.2/Makefile" for m in tar)
    assert _listing(SYSTEM_LISTS) == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]       # no .deb or apt state left
    mtime = path.stat().st_mtime_ns
    assert debian.tarball("7.2", tmp_path, quiet=True).stat().st_mtime_ns == mtime      # not again


@pytest.mark.slow
def test_a_suite_apt_cannot_read_is_one_clear_error_and_nothing_is_left(tmp_path):
    before = _listing(SYSTEM_LISTS)
    src = debian.DebianSource("7.2", "no-such-suite")
    with pytest.raises(InfraError, match=r"apt-get update for linux-source-7.2 \(no-such-suite\) failed") as e:
        debian.fetch(src, tmp_path, quiet=True)
    assert "nothing was changed in the system's apt state" in str(e.value.hint)
    assert _listing(SYSTEM_LISTS) == before
    assert not src.tarball(tmp_path).exists()
    assert [p.name for p in src.tarball(tmp_path).parent.iterdir()] == []        # no half-written state
