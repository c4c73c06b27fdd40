"""Guest-physical memory over QMP, and the address arithmetic of the pKVM host.

`pmemsave` makes QEMU write the bytes to a file it opens itself, so reads go through a private
temporary directory (tmpfs-backed /tmp in practice). A snapshot stops the vCPUs, reads a few
large regions at once, and decodes from those copies (`RegionCache`), falling back to live
reads only for what lies outside them.
"""

from __future__ import annotations

import contextlib
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

from harness.targets.qmp import QmpConnection

_2M = 2 << 20
MASK64 = (1 << 64) - 1


class WordReads:
    """Little-endian words over `read(pa, size)`: every EL2 memory (QMP's, a dump's) and its views."""

    def read(self, pa: int, size: int) -> bytes:
        raise NotImplementedError

    def u64(self, pa: int) -> int:
        return struct.unpack("<Q", self.read(pa, 8))[0]

    def u32(self, pa: int) -> int:
        return struct.unpack("<I", self.read(pa, 4))[0]

    def uint(self, pa: int, size: int) -> int:
        return int.from_bytes(self.read(pa, size), "little")


class PhysicalMemory(WordReads):
    def __init__(self, qmp_socket: Path, timeout: float = 10.0) -> None:
        self.qmp_socket = qmp_socket
        self.qmp = QmpConnection(qmp_socket, timeout)
        self._dir = tempfile.TemporaryDirectory(prefix="pkvm-pmem-")
        self._n = 0

    def read(self, pa: int, size: int) -> bytes:
        self._n += 1
        out = Path(self._dir.name) / f"chunk{self._n % 2}"
        self.qmp.execute("pmemsave", {"val": pa, "size": size, "filename": str(out)})
        data = out.read_bytes()
        if len(data) != size:
            raise OSError(f"pmemsave returned {len(data)} of {size} bytes at {pa:#x}")
        return data

    def running(self) -> bool:
        return bool(self.qmp.execute("query-status").get("running"))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Stop every vCPU for a consistent view; always resume (if it was running)."""
        was_running = self.running()
        if was_running:
            self.qmp.execute("stop")
        try:
            yield
        finally:
            if was_running:
                self.qmp.execute("cont")

    def kimage_voffset(self, symbols: dict[str, int]) -> int:
        with self.paused():
            return find_kimage_voffset(self, symbols)

    @contextlib.contextmanager
    def instant(self, wanted: set[int]) -> Iterator[RegionCache]:
        """The machine stopped: reads are consistent, and any page can be read (`wanted`, what a
        dump would have to be asked for, is not needed here)."""
        with self.paused():
            cache = RegionCache(self)
            yield cache
        cache.frozen = True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.qmp.close()
        self._dir.cleanup()

    def __enter__(self) -> PhysicalMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RegionCache(WordReads):
    """Reads served from large copies taken while the machine is stopped."""

    def __init__(self, mem: PhysicalMemory) -> None:
        self.mem = mem
        self.regions: list[tuple[int, bytes]] = []
        self.live_reads = 0
        self.frozen = False      # set once the machine runs again: a live read would be inconsistent
        self.missed: set[int] = set()      # never: a stopped machine has every page (a dump may not)

    def load(self, pa: int, size: int) -> None:
        self.regions.append((pa, self.mem.read(pa, size)))

    def read(self, pa: int, size: int) -> bytes:
        for base, data in self.regions:
            if base <= pa and pa + size <= base + len(data):
                return data[pa - base: pa - base + size]
        if self.frozen:
            raise LookupError(f"{pa:#x}+{size:#x} was not copied while the machine was stopped")
        self.live_reads += 1
        return self.mem.read(pa, size)


def find_kimage_voffset(mem: PhysicalMemory | RegionCache, syms: dict[str, int], ram_base: int = 0x4000_0000,
                        ram_size: int = 1 << 30) -> int:
    """kimage_voffset (kernel VA - PA), found by a self-checking search: the kernel image sits
    at a 2 MiB-aligned PA `cand` exactly when the word at `cand + (&kimage_voffset - _text)`
    equals `_text - cand`."""
    text, kvo = syms["_text"], syms["kimage_voffset"]
    for cand in range(ram_base, ram_base + ram_size, _2M):
        try:
            if mem.u64(cand + (kvo - text)) == (text - cand) & MASK64:
                return (text - cand) & MASK64
        except OSError:
            continue
    raise LookupError("kimage_voffset not found: no 2 MiB-aligned kernel image in guest RAM")
