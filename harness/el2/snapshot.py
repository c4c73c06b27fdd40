"""EL2 memory state of a running pKVM host: the I/O half (the decoding is harness.el2.decode).

EL2 memory comes from one of two places, and the same decoders read both:
  - QEMU's QMP (harness.el2.memory.PhysicalMemory): `snapshot()` stops the vCPUs, copies the hyp
    carveout and the nVHE data in two reads, decodes from those copies, and resumes;
  - a test kernel's dump file over the target's shell (harness.el2.dump.DumpMemory), on a board
    or on QEMU alike: each round is one dump, taken with every CPU stopped, of the pages the last
    snapshot read plus those the previous round missed; a snapshot is decoded from the first
    round that misses nothing.
A snapshot that finds a pool or the host stage-2 lock held (owner != next: a CPU was inside EL2),
or a dump that EL2 refused for a held lock, is thrown away and retried after the machine ran
briefly. Every offset comes from the vmlinux's DWARF
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
from harness.el2.dump import DumpBusy, DumpMemory, DumpView
from harness.el2.image import MemoryImage, RecordingReader
from harness.el2.memory import PhysicalMemory, RegionCache
from harness.el2.pgtable import PAGE_SIZE
from harness.el2.state import Snapshot

MAX_CARVEOUT = 1 << 30
MAX_NVHE_DATA = 16 << 20
MAX_ROUNDS = 8          # dumps a snapshot may take to get every page its decoding reads
MAX_DONATED_LEAF = 2 << 20


class SnapshotBusy(RuntimeError):
    """Every attempt found a vCPU inside EL2 holding a lock."""


class SnapshotIncomplete(RuntimeError):
    """Every dump lacked pages the decoding then read: EL2 kept changing between dumps."""


class El2Reader:
    """Reads EL2 state: from QEMU through its QMP socket, or from any target whose kernel has the
    dump file (a DumpMemory). `close()` it (or use `with`)."""

    def __init__(self, memory: Path | DumpMemory, vmlinux: Path, cache_dir: Path | None = None) -> None:
        self.kernel = ksyms.load(vmlinux, cache_dir)
        self.mem: PhysicalMemory | DumpMemory = PhysicalMemory(memory) if isinstance(memory, Path) else memory
        self.kimage_voffset = self.mem.kimage_voffset(self.kernel.symbols)
        self.wanted: set[int] = set()       # a dump's request: the pages the last snapshot read
        self.rounds = 0                     # dumps taken by the last snapshot (1 over QMP)

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
            try:
                snap, recorder = self._decode_one(attempt, record, while_paused)
            except DumpBusy:
                snap = recorder = None
            if snap is not None:
                snap.pause_ms = round((time.monotonic() - start) * 1000, 1)
                return snap, recorder
            time.sleep(0.002 * attempt)      # let the CPU inside EL2 finish and drop the lock
        raise SnapshotBusy(f"a pool or host stage-2 lock was held in all {attempts} attempts")

    def _decode_one(self, attempt: int, record: bool, while_paused: Callable[[], object] | None
                    ) -> tuple[Snapshot | None, RecordingReader | None]:
        """One consistent view, decoded; (None, None) when a lock was held. Over a dump, as many
        rounds as it takes to have every page the decoders read."""
        for self.rounds in range(1, MAX_ROUNDS + 1):
            with self.mem.instant(self.wanted) as cache:
                self._preload(cache)
                snap = recorder = None
                busy = decode.locks_held(cache.read, self.kernel, self.kimage_voffset)
                if cache.missed:                  # not even the carveout: nothing worth decoding yet
                    pass
                elif not busy:
                    recorder = RecordingReader(cache.read) if record else None
                    try:
                        snap = decode.decode_snapshot(recorder.read if recorder else cache.read, self.kernel,
                                                      self.kimage_voffset, attempts=attempt, taken_at=time.time())
                    except Exception:
                        if not cache.missed:      # decoding a dump's stand-in zeros may fail: not a finding
                            raise
                if while_paused is not None and not busy and not cache.missed:
                    while_paused()
            if not cache.missed:
                if isinstance(cache, DumpView):
                    self.wanted = cache.touched
                return (None, None) if busy else (snap, recorder)
            self.wanted |= cache.missed | (self._hyp_owned(snap) if snap is not None else set())
        raise SnapshotIncomplete(f"each of {MAX_ROUNDS} EL2 dumps lacked pages its decoding then read")

    def _hyp_owned(self, snap: Snapshot) -> set[int]:
        """Pages the hyp owns outside the carveout and the kernel image: what hosts donated (VM and
        vCPU structures, VM pools and the stage-2 tables in them), read from the hyp stage-1. A
        dump that asks for them at once needs no round per pointer a VM's decoding follows."""
        if snap.hyp_s1 is None or snap.carveout is None:
            return set()
        base, size = snap.carveout
        image = (self.kpa("_text"), self.kpa("_end"))
        out: set[int] = set()
        for leaf in snap.hyp_s1.leaves:
            pa = leaf.pa
            if pa is None or leaf.state != "OWNED" or base <= pa < base + size or image[0] <= pa < image[1]:
                continue
            out.update(range(pa, pa + min(leaf.size, MAX_DONATED_LEAF), PAGE_SIZE))
        return out

    def _nvhe_data_symbols(self) -> list[str]:
        return [NVHE + n for n in decode.NVHE_SYMBOLS if NVHE + n in self.kernel.symbols]

    def _preload(self, cache: RegionCache | DumpView) -> None:
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
