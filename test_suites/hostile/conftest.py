"""The hostile-host suite runs on a test kernel built with `--pkvm-config pkvm-hostile-host`; on
any other kernel it skips, saying so. Every test is followed by `el2_clean_after`: a clean log,
every invariant, and with el2trace every page-state transition the test made judged."""

from __future__ import annotations

import pytest

from harness.targets.hostile import HostileHost


@pytest.fixture(autouse=True)
def _el2_clean(el2_clean_after):
    yield


@pytest.fixture(scope="session")
def hostile(target, el2):
    host = HostileHost(target, el2.kernel.hypercalls)
    if not host.present():
        pytest.skip("this kernel has no hostile-host interface: build and boot it with "
                    "--pkvm-config pkvm-hostile-host (kernel_configs/pkvm-hostile-host.config)")
    return host
