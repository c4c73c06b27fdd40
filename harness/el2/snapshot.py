"""EL2 memory state of a running QEMU pKVM host: the I/O half (the decoding is harness.el2.decode).

`El2Reader.snapshot()` stops the vCPUs, copies the hyp carveout and the nVHE data in two reads,
has harness.el2.decode decode everything from those copies, and resumes. A snapshot that finds a
pool or the host stage-2 lock held (owner != next: a vCPU was inside EL2) is thrown away and
retried after the machine ran briefly. Every offset comes from the vmlinux's DWARF
(harness.el2.symbols); a part this kernel lacks by design is listed in `Snapshot.absent`, one
that could not be read in `Snapshot.unavailable`, each with the reason.

`El2Reader.snapshot_and_image()` also records every page the decoders read, as a
harness.el2.image.MemoryImage that decodes offline to the same snapshot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from harness.el2 import decode
from harness.el2 import symbols as ksyms
from harness.el2.decode import NVHE
from harness.el2.image import MemoryImage, RecordingReader
from harness.el2.memory import PhysicalMemory, RegionCache, find_kimage_voffset
from harness.el2.pgtable import PAGE_SIZE
from harness.el2.state import Snapshot

MAX_CARVEOUT = 1 << 30
MAX_NVHE_DATA = 16 << 20


class SnapshotBusy(RuntimeError):
    """Every attempt found a vCPU inside EL2 holding a lock."""


class El2Reader:
    """Reads EL2 state from a QEMU target. `close()` it (or use `with`)."""

    def __init__(self, qmp_socket: Path, vmlinux: Path, cache_dir: Path | None = None) -> None:
        self.kernel = ksyms.load(vmlinux, cache_dir)
        self.mem = PhysicalMemory(qmp_socket)
        with self.mem.paused():
            self.kimage_voffset = find_kimage_voffset(self.mem, self.kernel.symbols)

    def close(self) -> None:
        self.mem.close()

    def __enter__(self) -> El2Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def kpa(self, name: str) -> int:
        """Physical address of a kernel (or nVHE, with the prefix) symbol."""
        return decode.kpa(self.kernel, self.kimage_voffset, name)

    def h2p(self, snap: Snapshot, va: int) -> int:
        """Hyp VA (linear map) -> PA, with the snapshot's hyp_physvirt_offset."""
        return decode.h2p(snap.hyp_physvirt_offset, va)

    # --- taking a snapshot -----------------------------------------------------------------

    def snapshot(self, attempts: int = 50, while_paused: Callable[[], object] | None = None) -> Snapshot:
        """`while_paused` runs once, with the machine still stopped at the snapshot's instant (the
        live replay reads the trace up to that instant there)."""
        return self._take(attempts, record=False, while_paused=while_paused)[0]

    def snapshot_and_image(self, attempts: int = 50) -> tuple[Snapshot, MemoryImage]:
        """A snapshot, and the memory image of every page its decoding read (while stopped).
        `image.decode()` gives the same snapshot offline."""
        snap, recorder = self._take(attempts, record=True)
        assert recorder is not None
        return snap, recorder.image(self.kernel, self.kimage_voffset, snap)

    def _take(self, attempts: int, record: bool,
              while_paused: Callable[[], object] | None = None) -> tuple[Snapshot, RecordingReader | None]:
        for attempt in range(1, attempts + 1):
            start = time.monotonic()
            recorder = None
            with self.mem.paused():
                cache = RegionCache(self.mem)
                self._preload(cache)
                busy = decode.locks_held(cache.read, self.kernel, self.kimage_voffset)
                snap = None
                if not busy:
                    recorder = RecordingReader(cache.read) if record else None
                    snap = decode.decode_snapshot(recorder.read if recorder else cache.read, self.kernel,
                                                  self.kimage_voffset, attempts=attempt, taken_at=time.time())
                    if while_paused is not None:
                        while_paused()
            cache.frozen = True
            pause_ms = (time.monotonic() - start) * 1000
            if snap is not None:
                snap.pause_ms = round(pause_ms, 1)
                return snap, recorder
            time.sleep(0.002 * attempt)      # let the vCPU inside EL2 finish and drop the lock
        raise SnapshotBusy(f"a pool or host stage-2 lock was held in all {attempts} attempts")

    def _nvhe_data_symbols(self) -> list[str]:
        return [NVHE + n for n in decode.NVHE_SYMBOLS if NVHE + n in self.kernel.symbols]

    def _preload(self, cache: RegionCache) -> None:
        """Two big reads: the carveout (pools, tables, vmemmap backing) and the nVHE data, each
        whole pages (so a memory image can record whole pages from them)."""
        try:
            base, size = decode.decode_carveout(cache.read, self.kernel, self.kimage_voffset)
            if 0 < size <= MAX_CARVEOUT:
                cache.load(base & -PAGE_SIZE, -(-(base + size) // PAGE_SIZE) * PAGE_SIZE - (base & -PAGE_SIZE))
        except decode.DECODE_ERRORS:
            pass
        addrs = sorted(self.kpa(n) for n in self._nvhe_data_symbols())
        if addrs and addrs[-1] - addrs[0] < MAX_NVHE_DATA:
            first = addrs[0] & -PAGE_SIZE
            end = (addrs[-1] & -PAGE_SIZE) + 2 * PAGE_SIZE     # the last symbol's struct may cross a page
            cache.load(first, end - first)
