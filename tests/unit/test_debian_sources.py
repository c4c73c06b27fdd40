"""`--kernel X.Y`: which Debian package each series comes from, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import UsageError
from harness.kernel import debian


def test_debian_12s_own_series_are_installed_the_newer_ones_fetched_into_the_cache(tmp_path):
    assert debian.SOURCES["6.12"].tarball(tmp_path) == Path("/usr/src/linux-source-6.12.tar.xz")
    assert debian.SOURCES["6.1"].suite is None
    assert debian.SOURCES["7.3"].suite == "trixie-backports" and debian.SOURCES["7.2"].suite == "sid"
    assert debian.SOURCES["7.3"].tarball(tmp_path) == tmp_path / "debian/linux-source-7.3/linux-source-7.3.tar.xz"
    assert debian.DEFAULT == "6.12"


def test_an_unknown_series_names_the_known_ones(tmp_path):
    with pytest.raises(UsageError, match="--kernel 5.4 is not a Debian kernel source") as e:
        debian.tarball("5.4", tmp_path)
    assert "6.1, 6.12, 7.2, 7.3" in str(e.value.hint)
