"""Every test of this EL2 suite is followed by the plugin's `el2_clean_after`: the kernel log since
the test began is clean, and every invariant holds on a fresh snapshot."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _el2_clean(el2_clean_after):
    yield
