"""Guest-physical memory reads over QMP, and the kernel's virtual-to-physical offset.

`pmemsave` writes the bytes to a file that QEMU opens itself, so the file lives in a private
temporary directory. Callers that need a consistent view stop the machine around their reads
(`paused()`).
"""

from __future__ import annotations

import contextlib
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

from harness.targets import qmp

_2M = 2 << 20


class PhysicalMemory:
    def __init__(self, qmp_socket: Path, timeout: float = 10.0) -> None:
        self.qmp_socket = qmp_socket
        self.timeout = timeout
        self._dir = tempfile.TemporaryDirectory(prefix="pkvm-pmem-")

    def read(self, pa: int, size: int) -> bytes:
        out = Path(self._dir.name) / "chunk"
        qmp.execute(self.qmp_socket, "pmemsave", {"val": pa, "size": size, "filename": str(out)},
                    timeout=self.timeout)
        data = out.read_bytes()
        if len(data) != size:
            raise OSError(f"pmemsave returned {len(data)} of {size} bytes at {pa:#x}")
        return data

    def u64(self, pa: int) -> int:
        return struct.unpack("<Q", self.read(pa, 8))[0]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stop every vCPU for a consistent view; always resume."""
        qmp.execute(self.qmp_socket, "stop", timeout=self.timeout)
        try:
            yield
        finally:
            qmp.execute(self.qmp_socket, "cont", timeout=self.timeout)

    def close(self) -> None:
        self._dir.cleanup()


def find_kimage_voffset(mem: PhysicalMemory, syms: dict[str, int], ram_base: int = 0x4000_0000,
                        ram_size: int = 1 << 30) -> int:
    """kimage_voffset (kernel VA - PA), found by a self-checking search: the kernel image sits
    at a 2 MiB-aligned PA `cand` exactly when the word at `cand + (&kimage_voffset - _text)`
    equals `_text - cand`."""
    text, kvo = syms["_text"], syms["kimage_voffset"]
    for cand in range(ram_base, ram_base + ram_size, _2M):
        try:
            if mem.u64(cand + (kvo - text)) == (text - cand) & (2**64 - 1):
                return (text - cand) & (2**64 - 1)
        except OSError:
            continue
    raise LookupError("kimage_voffset not found: no 2 MiB-aligned kernel image in guest RAM")
