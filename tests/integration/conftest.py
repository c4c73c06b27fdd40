"""Integration fixtures: one real kernel build per session (or the cache's), shared by every test."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.image.initramfs import build_initramfs
from harness.kernel.build import build
from harness.machine import Machine, MachineRequest, assemble, build_request
from harness.options import BootOptions, KernelOptions
from harness.paths import default_cache_dir

HARNESS = [sys.executable, "-m", "harness"]


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return default_cache_dir()   # the same cache `make run` uses, so CI builds once


@pytest.fixture(scope="session")
def kernel(cache_dir):
    return build(build_request(KernelOptions(), cache_dir, quiet=True))


def assembled(cache_dir: Path, run_dir: Path, kernel: KernelOptions | None = None, *, gdb: bool = False,
              payloads: bool = True, **boot) -> Machine:
    """A machine as the CLI and the plugin assemble it (harness.machine), with boot options `boot`."""
    request = MachineRequest.check(kernel or KernelOptions(), BootOptions(**boot), cache_dir, quiet=True)
    return assemble(request, run_dir, gdb=gdb, payloads=payloads)


@pytest.fixture(scope="session")
def initramfs(cache_dir):
    return build_initramfs(cache_dir)


def run_cli(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, as a user runs it."""
    return subprocess.run([*HARNESS, *args], capture_output=True, text=True, timeout=timeout, **kw)


def qemu_pids_mentioning(text: str) -> list[int]:
    """PIDs of live QEMU processes whose command line contains `text` (a test's own tmp path)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().split()[2]
        except OSError:
            continue
        if "qemu-system" in cmdline and text in cmdline and state != "Z":
            pids.append(int(entry))
    return pids


def wait_until(predicate, seconds: float, step: float = 0.05):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()
