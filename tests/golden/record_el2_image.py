"""Re-record tests/golden/el2-image-<series>/ from a live QEMU (run by hand, not by pytest).

    .venv/bin/python tests/golden/record_el2_image.py                 # the default kernel (6.12)
    .venv/bin/python tests/golden/record_el2_image.py --kernel 6.1

Boots the kernel with the default options (-cpu max, -smp 2, 1024 MiB) and the guest payloads,
starts one VM that holds its memory (`pkvm_guest --vms 1 --pages 4 --hold 20`) so vm_table and a
VM pool are not empty (on kernels that have them), waits for it to be ready, and takes one
snapshot with `El2Reader.snapshot_and_image()`. It then reads the vmemmap entry of every 256th
page of each memblock through that snapshot (so those pages are recorded too) and writes:

    image.el2img    the memory image (harness.el2.image): every page the decoding read
    snapshot.json   the live snapshot's to_dict()
    facts.json      what to_dict() leaves out (harness.el2.image.snapshot_facts): every pool
                    page's refcount/order summed and hashed, the vmemmap sample, the leaves of
                    both page tables hashed
tests/unit/test_el2_decode.py decodes the image offline and compares with the other two.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from harness.el2.image import snapshot_facts
from harness.el2.snapshot import El2Reader
from harness.image.payloads import GUEST_DIR
from harness.kernel.version import KernelVersion
from harness.machine import MachineRequest, assemble
from harness.options import BootOptions, KernelOptions
from harness.paths import default_cache_dir
from harness.targets.qemu_target import QemuTarget

HERE = Path(__file__).resolve().parent
WORKLOAD = f"{GUEST_DIR}/pkvm_guest --vms 1 --pages 4 --hold 20"


def wait_for(target: QemuTarget, word: str, log: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while word not in (out := target.run(f"cat {log}").stdout):
        if time.monotonic() > deadline:
            raise SystemExit(f"the guest did not print {word!r} within {seconds:.0f} s:\n{out}")
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default=None, help='a Debian linux-source series, e.g. "6.1" (default: 6.12)')
    ap.add_argument("--out", type=Path, default=None, help="directory (default: tests/golden/el2-image-<series>)")
    args = ap.parse_args()

    cache = default_cache_dir()
    request = MachineRequest.check(KernelOptions(kernel=args.kernel), BootOptions(), cache, quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        machine = assemble(request, run_dir)
        spec = machine.spec
        with machine.start(run_dir) as target, El2Reader(target.qmp_socket, machine.kernel.vmlinux, cache) as reader:
            version = KernelVersion.parse(reader.kernel.version)
            out = args.out or HERE / f"el2-image-{version.series}"
            target.run(f"{WORKLOAD} > /tmp/img.log 2>&1 &").check()
            wait_for(target, "ready", "/tmp/img.log", 120)
            snap, image = reader.snapshot_and_image()
            facts = snapshot_facts(snap)          # reads the vmemmap sample: recorded into the image
            image.meta.update({"recorded_by": "tests/golden/record_el2_image.py", "workload": WORKLOAD,
                               "boot": {"cpu": spec.cpu, "smp": spec.smp, "mem": spec.mem},
                               "build_id": reader.kernel.build_id})
            wait_for(target, "done", "/tmp/img.log", 120)
    out.mkdir(parents=True, exist_ok=True)
    size = image.save(out / "image.el2img")
    (out / "snapshot.json").write_text(json.dumps(snap.to_dict(), indent=1, sort_keys=True) + "\n")
    (out / "facts.json").write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}: image {size} bytes ({len(image.pages)} pages), {len(snap.vms)} VMs, "
          f"pools {sorted(snap.pools)}, pause {snap.pause_ms} ms, unavailable {snap.unavailable}")


if __name__ == "__main__":
    main()
