"""Re-record tests/golden/gdbstub-session.log from a live QEMU (run by hand, not by pytest).

    .venv/bin/python tests/golden/record_gdbstub_session.py

Boots the default kernel with its gdbstub, runs a VM in the background so the host calls
hyp_alloc_pages, and makes the client calls tests/unit/test_gdbstub.py replays: connect, set a
breakpoint, wait for a hit, read the registers, step over the breakpoint, read the PC, continue,
interrupt, detach. The first line of the log names the breakpoint address.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from harness.el2.gdbstub import GdbStub
from harness.el2.snapshot import NVHE, El2Reader
from harness.image.payloads import GUEST_DIR
from harness.machine import MachineRequest, assemble
from harness.options import BootOptions, KernelOptions
from harness.paths import default_cache_dir

GOLDEN = Path(__file__).resolve().parent / "gdbstub-session.log"


def main() -> None:
    cache = default_cache_dir()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        machine = assemble(MachineRequest.check(KernelOptions(), BootOptions(), cache, quiet=True), run_dir, gdb=True)
        with machine.start(run_dir) as target, El2Reader(target.qmp_socket, target.vmlinux, cache) as reader:
            snap = reader.snapshot()
            # Started in the background and delayed, so the breakpoint is set before the VM is.
            target.run(f"(sleep 3; {GUEST_DIR}/pkvm_guest --vms 1) >/dev/null 2>&1 &").check()
            bp = (reader.kpa(NVHE + "hyp_alloc_pages") - snap.hyp_physvirt_offset) & (2**64 - 1)
            log: list[str] = []
            with GdbStub(target.gdb_socket, 10.0, log=log) as g:
                g.set_breakpoint(bp)
                g.resume()
                stop = g.wait_stop(30)
                assert stop is not None, "no hyp_alloc_pages call within 30 s"
                g.registers(stop.thread)
                g.remove_breakpoint(bp)
                g.step(stop.thread)
                g.read_pc()
                g.resume()
                g.interrupt()
            GOLDEN.write_text(f"# hyp_alloc_pages hyp VA {bp:#x}\n" + "\n".join(log) + "\n")
    print(f"wrote {GOLDEN} ({len(log)} packets)")


if __name__ == "__main__":
    main()
