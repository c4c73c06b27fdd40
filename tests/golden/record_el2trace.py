"""Re-record tests/golden/el2trace-6.12/ from a live QEMU 10 (run by hand, not by pytest).

    .venv/bin/python tests/golden/record_el2trace.py

`pkvm-harness trace -- pkvm_guest --vms 2` on the default kernel and boot options: el2trace runs
from power-on to the end of the command, then the final snapshot is taken while paused at the last
record read. Kept: the stream up to that instant plus the block counts written at exit (xz), its
layout, and the final snapshot (xz).
"""

from __future__ import annotations

import lzma
import shutil
import tempfile
from pathlib import Path

from harness.commands.trace import trace_command
from harness.el2.tcg.stream import COVER, HEADER, STATS, Record, read_records
from harness.image.payloads import GUEST_DIR
from harness.options import BootOptions, KernelOptions
from harness.paths import default_cache_dir

GOLDEN = Path(__file__).resolve().parent / "el2trace-6.12"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = trace_command(KernelOptions(), BootOptions(), default_cache_dir(), Path(tmp),
                            f"{GUEST_DIR}/pkvm_guest --vms 2", quiet=True)
        assert out.replay.ok, "a stock kernel's trace must replay with 0 divergences"
        GOLDEN.mkdir(exist_ok=True)
        stream = (out.run_dir / "el2trace.bin").read_bytes()
        offset = int((out.run_dir / "el2trace-snapshot-offset").read_text())
        # up to the snapshot's instant, then the block counts and statistics QEMU wrote at exit
        records, _ = read_records(stream)
        tail = b"".join(_raw(stream, r) for r in records if r.type in (COVER, STATS))
        (GOLDEN / "el2trace.bin.xz").write_bytes(lzma.compress(stream[:offset] + tail, preset=9))
        (GOLDEN / "snapshot-final.json.xz").write_bytes(
            lzma.compress((out.run_dir / "snapshot-final.json").read_bytes(), preset=9))
        shutil.copy(out.run_dir / "el2trace-layout.json", GOLDEN)
    print(f"recorded {GOLDEN}")


def _raw(stream: bytes, record: Record) -> bytes:
    """A record's bytes again (header and payload, as the plugin wrote them)."""
    return HEADER.pack(HEADER.size + len(record.payload), record.type, ord(record.kind) if record.kind else 0,
                       record.fn, record.vcpu, record.failed, record.seq, record.pc) + record.payload


if __name__ == "__main__":
    main()
