"""The generated QEMU command line, one golden file per CPU / transport / gdbstub
combination (as tuxrun keeps one per device and job): a change to what QEMU is asked to run shows as a
diff in tests/golden/qemu-argv/. Regenerate with PKVM_UPDATE_GOLDEN=1 after checking the change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.image.initramfs import Initramfs
from harness.kernel.build import KernelArtifacts
from harness.machine import qemu_spec
from harness.options import BootOptions
from harness.targets.qemu_target import spec_for_transport

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "qemu-argv"
RUN_DIR = Path("/runs/r")     # short, so the sockets stay in it

CASES = {
    "max-console": dict(cpu="max"),
    "max-ssh": dict(cpu="max", transport="ssh"),
    "cortex-a72-console": dict(cpu="cortex-a72"),
    "cortex-a72-ssh": dict(cpu="cortex-a72", transport="ssh"),
    "max-console-gdb": dict(cpu="max", gdb=True),                      # trace, and the suites
    "cortex-a72-console-gdb": dict(cpu="cortex-a72", gdb=True),
    "max-options": dict(cpu="max", smp=4, mem="2G", append=["loglevel=8", "kvm-arm.hyp_debug=1"],
                        qemu_args=["-d", "guest_errors"]),
    # two RAM regions, one NUMA node each (the nightly's second machine shape)
    "max-ram-regions": dict(cpu="max", smp=3, ram_regions="768M,640M"),
}


def argv(cpu: str, transport: str = "console", gdb: bool = False, **boot) -> list[str]:
    kernel = KernelArtifacts("k" * 24, Path("/cache/kernels/k"), {}, reused=True)
    image = Initramfs(Path("/cache/initramfs/i.cpio"), "0" * 64, ())
    spec = qemu_spec(BootOptions(cpu=cpu, **boot), kernel, image, RUN_DIR, gdb=gdb)
    spec = spec_for_transport(spec, transport, ssh_port=10022)
    return spec.argv()


@pytest.mark.parametrize("name", sorted(CASES))
def test_qemu_command_line_matches_its_golden_file(name):
    got = "\n".join(argv(**CASES[name])) + "\n"
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("PKVM_UPDATE_GOLDEN"):
        path.write_text(got)
    assert path.is_file(), f"{path} is missing: run with PKVM_UPDATE_GOLDEN=1 and review it"
    assert got == path.read_text(), f"the QEMU command line of {name} changed; if on purpose, regenerate"


def test_every_golden_file_is_a_case():
    assert {p.stem for p in GOLDEN.glob("*.txt")} == set(CASES)
