"""EL2 memory through a test kernel's dump file, over the target's shell: how a board is read.

A kernel built with `--config pkvm-el2-dump` (harness/kernel/el2dump/) has the host hypercall
__pkvm_el2_dump and /sys/kernel/debug/pkvm_el2dump/dump: the harness writes the page ranges it
wants, reads the file, and gets them copied at one instant (the kernel stops every CPU while EL2
copies them), all-zero pages as a count. That file's format is parsed here (`parse`).

`DumpMemory` is El2Reader's second memory, beside QMP's PhysicalMemory: same reads, same
decoders, same Snapshot. A dump holds only what was asked for, so a snapshot is taken in rounds
(`DumpView.missed`): the decoders run over the dump, every page they wanted and it lacked is
asked for in the next dump (of everything again, so the final decode sees one instant), until a
decode wants nothing more. The pages the last snapshot read are the next one's first request,
so a quiescent system takes one round.
"""

from __future__ import annotations

import base64
import contextlib
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness.el2 import symbols as ksyms
from harness.el2.memory import WordReads
from harness.el2.pgtable import PAGE_SIZE
from harness.errors import UsageError
from harness.targets.base import Target

DIR = "/sys/kernel/debug/pkvm_el2dump"
FILE = f"{DIR}/dump"
MAGIC = b"PKVMDMP2"
HEADER = struct.Struct("<8sQQQQQQ")      # magic, kimage_voffset, nr_records, nr_data_pages, seq, ring_begin, ring_end
DUMP_MARK = 0x504B_4800_0000_0000        # a dump writes the trace event "selftest id=DUMP_MARK|seq" (7.x),
DUMP_END = 1 << 40                       # before its copies, and "selftest id=DUMP_MARK|DUMP_END|seq" after
RECORD = struct.Struct("<QIi")           # pa, nr_pages, kind (0 copied, 1 all zero, < 0 -errno)
LINE_BUDGET = 512                        # characters of ranges a shell line (a console line holds 768)


class BadDump(ValueError):
    """Bytes that are not a dump (or a truncated one)."""


class DumpBusy(RuntimeError):
    """EL2 held the host stage-2 or hyp stage-1 lock: ask again."""


@dataclass
class Dump:
    kimage_voffset: int
    seq: int = 0                                            # the dump's number since boot (its trace mark)
    ring: tuple[int, int] = (0, 0)     # the rings' counts at the first and the last copy (packed: harness.el2.ring)
    pages: dict[int, bytes] = field(default_factory=dict)   # page PA -> its bytes (all-zero ones included)
    refused: dict[int, int] = field(default_factory=dict)   # page PA -> the hypercall's errno

    def read(self, pa: int, size: int) -> bytes:
        """Bytes of pages in the dump; KeyError naming the first page it lacks."""
        first = pa & -PAGE_SIZE
        data = b"".join(self.page(p) for p in range(first, pa + size, PAGE_SIZE))
        return data[pa - first: pa - first + size]

    def page(self, pa: int) -> bytes:
        if pa in self.refused:
            raise OSError(f"EL2 refused to copy page {pa:#x}: errno {self.refused[pa]}")
        return self.pages[pa]


def parse(blob: bytes) -> Dump:
    if len(blob) < HEADER.size or blob[:8] != MAGIC:
        raise BadDump(f"not an EL2 dump ({len(blob)} bytes, starting {blob[:8]!r})")
    _, kvo, nr_records, nr_data, seq, ring_begin, ring_end = HEADER.unpack_from(blob)
    data_at = HEADER.size + nr_records * RECORD.size
    if len(blob) != data_at + nr_data * PAGE_SIZE:
        raise BadDump(f"an EL2 dump of {len(blob)} bytes where its header says {data_at + nr_data * PAGE_SIZE}")
    dump = Dump(kvo, seq=seq, ring=(ring_begin, ring_end))
    zero = bytes(PAGE_SIZE)
    for i in range(nr_records):
        pa, n, kind = RECORD.unpack_from(blob, HEADER.size + i * RECORD.size)
        for k in range(n):
            if kind == 0:
                dump.pages[pa + k * PAGE_SIZE] = blob[data_at: data_at + PAGE_SIZE]
                data_at += PAGE_SIZE
            elif kind == 1:
                dump.pages[pa + k * PAGE_SIZE] = zero
            else:
                dump.refused[pa + k * PAGE_SIZE] = -kind
    if data_at != len(blob):
        copied = (data_at - HEADER.size - nr_records * RECORD.size) // PAGE_SIZE
        raise BadDump(f"an EL2 dump whose records copy {copied} pages where its header says {nr_data}")
    return dump


def runs(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Page PAs -> (first PA, number of pages) runs, sorted."""
    out: list[tuple[int, int]] = []
    for p in sorted(set(pages)):
        if out and out[-1][0] + out[-1][1] * PAGE_SIZE == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


class DumpView(WordReads):
    """One dump, read as a RegionCache is read: a page it lacks reads as zeros and is recorded in
    `missed` (that decode is thrown away, and the next dump asks for the page)."""

    frozen = True                        # never a live read: the machine ran on after the dump

    def __init__(self, dump: Dump) -> None:
        self.dump = dump
        self.missed: set[int] = set()
        self.touched: set[int] = set()

    def load(self, pa: int, size: int) -> None:
        """What a QMP pause copies in bulk: here, pages to have in the dump."""
        for p in range(pa & -PAGE_SIZE, pa + size, PAGE_SIZE):
            self.touched.add(p)
            if p not in self.dump.pages and p not in self.dump.refused:
                self.missed.add(p)

    def read(self, pa: int, size: int) -> bytes:
        first = pa & -PAGE_SIZE
        chunks = []
        for p in range(first, pa + size, PAGE_SIZE):
            self.touched.add(p)
            if p in self.dump.pages or p in self.dump.refused:
                chunks.append(self.dump.page(p))
            else:
                self.missed.add(p)
                chunks.append(bytes(PAGE_SIZE))
        return b"".join(chunks)[pa - first: pa - first + size]


class DumpMemory(WordReads):
    """A target's memory, through its kernel's dump file (see the module doc)."""

    def __init__(self, target: Target, scratch: str = "/tmp") -> None:
        self.target = target
        self.remote = f"{scratch}/pkvm-el2dump.bin"
        target.run(f"mkdir -p {scratch}").check()
        self._dir = tempfile.TemporaryDirectory(prefix="pkvm-el2dump-")
        self.dumps = 0
        self.bytes_fetched = 0
        self.seconds = 0.0                       # spent taking and fetching dumps
        self.last_seq = 0                        # the number of the last dump taken
        self.last_ring = 0                       # the hyp's rings' counts at the last dump (packed: ring.Ring.count)

    @staticmethod
    def present(target: Target) -> bool:
        return target.run(f"test -r {FILE}").ok

    def take(self, pages: Iterable[int]) -> Dump:
        """One dump of these pages (PAs, page-aligned), at one instant."""
        started = time.monotonic()
        lines = [f"{pa:#x} {n}\\n" for pa, n in runs(pages)]
        chunks: list[str] = [] if lines else ["\\n"]      # a write always starts a new request
        for line in lines:
            if chunks and len(chunks[-1]) + len(line) <= LINE_BUDGET:
                chunks[-1] += line
            else:
                chunks.append(line)
        for chunk in chunks:
            self.target.run(f"printf '{chunk}' > {FILE}").check()
        r = self.target.run(f"cat {FILE} > {self.remote}", timeout=120)
        if not r.ok:
            if "busy" in (r.stderr + r.stdout).lower():
                raise DumpBusy(f"EL2 held a lock: {(r.stderr or r.stdout).strip()}")
            r.check()
        local = Path(self._dir.name) / "dump.bin"
        self.target.get(self.remote, local)
        blob = local.read_bytes()
        self.dumps += 1
        self.bytes_fetched += len(blob)
        self.seconds += time.monotonic() - started
        dump = parse(blob)
        self.last_seq, self.last_ring = dump.seq, dump.ring[1]
        return dump

    # --- what El2Reader asks of a memory (harness.el2.memory.PhysicalMemory has the same) ---

    def read(self, pa: int, size: int) -> bytes:
        return self.take(range(pa & -PAGE_SIZE, pa + size, PAGE_SIZE)).read(pa, size)

    def kimage_voffset(self, symbols: dict[str, int]) -> int:
        return self.take([]).kimage_voffset

    @contextlib.contextmanager
    def instant(self, wanted: set[int]) -> Iterator[DumpView]:
        dump = self.take(wanted)
        if dump.ring[0] != dump.ring[1]:     # a kernel with the event ring tells: EL2 changed mid-copy
            raise DumpBusy(f"EL2 recorded calls in its event rings while dump {dump.seq} was copied (their counts "
                           f"{dump.ring[0]:#x}, then {dump.ring[1]:#x})")
        yield DumpView(dump)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.target.run(f"rm -f {self.remote}")
        self._dir.cleanup()


NT_GNU_BUILD_ID = 3


def running_build_id(target: Target) -> str | None:
    """The GNU build ID of the kernel the target runs (its /sys/kernel/notes); None if unreadable."""
    r = target.run("base64 /sys/kernel/notes")
    if not r.ok:
        return None
    notes = base64.b64decode("".join(r.stdout.split()))
    at = 0
    while at + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, at)
        name = notes[at + 12: at + 12 + namesz].rstrip(b"\0")
        desc_at = at + 12 + ((namesz + 3) & ~3)
        if kind == NT_GNU_BUILD_ID and name == b"GNU":
            return notes[desc_at: desc_at + descsz].hex()
        at = desc_at + ((descsz + 3) & ~3)
    return None


def check_vmlinux(target: Target, vmlinux: Path, cache_dir: Path | None) -> None:
    """Refuse to decode a board's memory with a vmlinux that is not the kernel it runs: every
    offset would be wrong, and the snapshots nonsense."""
    if not vmlinux.is_file():
        raise UsageError(f"no vmlinux at {vmlinux}", hint="pass the O= directory of the board's kernel "
                         "with --pkvm-kernel-build, or the options it was built with")
    have = ksyms.load(vmlinux, cache_dir).build_id
    runs_id = running_build_id(target)
    if runs_id is None:
        raise UsageError(f"{target.name}: /sys/kernel/notes cannot be read, so its kernel cannot be "
                         f"matched to {vmlinux}",
                         hint="the harness needs root on the board")
    if runs_id != have:
        raise UsageError(f"{target.name} runs the kernel with build ID {runs_id[:16]}, {vmlinux} is {have[:16]}",
                         hint="install that build on the board (docs/boards.md), or pass the board's own with "
                              "--pkvm-kernel-build")
