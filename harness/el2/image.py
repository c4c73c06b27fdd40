"""A memory image: the pages EL2 decoding read from one live machine, to decode again offline.

`RecordingReader` wraps any `read(pa, size) -> bytes` and keeps a copy of every page a read
touched (whole 4 KiB pages, fetched once; later reads of a page are served from the copy, so the
decoders see one consistent view). `MemoryImage` holds those pages plus what offline decoding
needs: kimage_voffset, the kernel version string and the kernel's layout (the KernelInfo of
harness.el2.symbols, trimmed to the symbols and structs harness.el2.decode uses, serialised as
symbols.py serialises it for its cache). `MemoryImage.decode()` runs the same decoders over the
recorded pages; a read of a page that was not recorded raises `MissingPage` (never zeros).

File format (`save`/`load`), one xz (lzma) stream:

    PKVM-EL2-IMAGE 1\\n
    <header: one line of JSON>\\n
    <the bytes of every page listed in header["pages"], in that order>

header: {"kernel_version": str, "kimage_voffset": int, "page_size": 4096,
         "pages": [[first PA, number of pages], ...]   runs of pages stored with their data,
         "zero_pages": [[first PA, number], ...]        runs of recorded all-zero pages (no data),
         "meta": {...}                                  taken_at, pause_ms, attempts, free-form notes,
         "kernel": {...}}                               symbols.py's KernelInfo JSON, trimmed
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from harness.el2 import decode
from harness.el2 import symbols as ksyms
from harness.el2.pgtable import PAGE_SIZE
from harness.el2.state import Snapshot

MAGIC = b"PKVM-EL2-IMAGE 1\n"
ZERO_PAGE = bytes(PAGE_SIZE)
ReadFn = Callable[[int, int], bytes]


class MissingPage(LookupError):
    """A read of a page the image did not record."""


class BadImage(ValueError):
    """A file that is not a memory image, or a damaged one."""


def _pages_of(pa: int, size: int) -> range:
    return range(pa & -PAGE_SIZE, pa + max(size, 1), PAGE_SIZE) if size > 0 else range(0)


def _slice(pages: dict[int, bytes], fetch: Callable[[int], bytes], pa: int, size: int) -> bytes:
    first = pa & -PAGE_SIZE
    if pa + size <= first + PAGE_SIZE:                       # the common case: inside one page
        return fetch(first)[pa - first: pa - first + size]
    data = b"".join(fetch(p) for p in _pages_of(pa, size))
    return data[pa - first: pa - first + size]


class RecordingReader:
    """A read callable that records every page its reads touch (see the module doc)."""

    def __init__(self, source: ReadFn) -> None:
        self._source = source
        self.pages: dict[int, bytes] = {}

    def _fetch(self, page: int) -> bytes:
        data = self.pages.get(page)
        if data is None:
            data = self._source(page, PAGE_SIZE)
            if len(data) != PAGE_SIZE:
                raise OSError(f"the source returned {len(data)} of {PAGE_SIZE} bytes at {page:#x}")
            self.pages[page] = bytes(data)
        return data

    def read(self, pa: int, size: int) -> bytes:
        if size <= 0:
            return b""
        return _slice(self.pages, self._fetch, pa, size)

    def image(self, kernel: ksyms.KernelInfo, kimage_voffset: int, snap: Snapshot | None = None,
              **meta: object) -> MemoryImage:
        """The recorded pages as an image; with `snap`, the attempts/taken_at/pause_ms it reported
        (so the image decodes to an identical `to_dict()`). The image shares this reader's pages:
        what is read through it later (a live snapshot's lazy `page()` of the vmemmap) is added."""
        if snap is not None:
            meta = {"attempts": snap.attempts, "taken_at": snap.taken_at, "pause_ms": snap.pause_ms, **meta}
        return MemoryImage(trim_kernel(kernel), kimage_voffset, self.pages, meta)


def trim_kernel(kernel: ksyms.KernelInfo) -> ksyms.KernelInfo:
    """The KernelInfo with only what harness.el2.decode looks up (the full one has every symbol
    of the vmlinux)."""
    wanted = set(decode.used_symbols())
    return dataclasses.replace(
        kernel,
        symbols={n: a for n, a in kernel.symbols.items() if n in wanted},
        structs={n: s for n, s in kernel.structs.items() if n in decode.STRUCTS},
        missing={n: why for n, why in kernel.missing.items() if n in decode.STRUCTS},
        sizes={})


def _runs(pages: Iterable[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for p in sorted(pages):
        if runs and runs[-1][0] + runs[-1][1] * PAGE_SIZE == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return runs


def _unrun(runs: list[list[int]]) -> list[int]:
    return [start + i * PAGE_SIZE for start, n in runs for i in range(n)]


@dataclass
class MemoryImage:
    kernel: ksyms.KernelInfo          # trimmed (trim_kernel)
    kimage_voffset: int
    pages: dict[int, bytes]           # page PA -> its 4 KiB
    meta: dict = field(default_factory=dict)

    @property
    def kernel_version(self) -> str:
        return self.kernel.version

    def read(self, pa: int, size: int) -> bytes:
        if size <= 0:
            return b""
        return _slice(self.pages, self._page, pa, size)

    def _page(self, page: int) -> bytes:
        try:
            return self.pages[page]
        except KeyError:
            raise MissingPage(f"page {page:#x} is not in the memory image (the live decoding never read it)") \
                from None

    def decode(self) -> Snapshot:
        """The snapshot the recorded pages give, decoded as El2Reader decodes live memory."""
        return decode.decode_snapshot(self.read, self.kernel, self.kimage_voffset,
                                      attempts=self.meta.get("attempts", 1), taken_at=self.meta.get("taken_at", 0.0),
                                      pause_ms=self.meta.get("pause_ms", 0.0))

    # --- changed copies, for tests -------------------------------------------------------------

    def without(self, pa: int) -> MemoryImage:
        """A copy lacking the page that holds pa."""
        return dataclasses.replace(self, pages={p: d for p, d in self.pages.items() if p != pa & -PAGE_SIZE})

    def patched(self, pa: int, data: bytes) -> MemoryImage:
        """A copy with `data` written at pa (inside recorded pages)."""
        pages = dict(self.pages)
        for i, byte in enumerate(data):
            page = (pa + i) & -PAGE_SIZE
            buf = bytearray(pages.get(page) or self._page(page))
            buf[pa + i - page] = byte
            pages[page] = bytes(buf)
        return dataclasses.replace(self, pages=pages)

    # --- file ----------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        data_pages = sorted(p for p, d in self.pages.items() if d != ZERO_PAGE)
        zero_pages = sorted(p for p, d in self.pages.items() if d == ZERO_PAGE)
        header = {"kernel_version": self.kernel.version, "kimage_voffset": self.kimage_voffset,
                  "page_size": PAGE_SIZE, "pages": _runs(data_pages), "zero_pages": _runs(zero_pages),
                  "meta": self.meta, "kernel": ksyms.to_json(self.kernel)}
        raw = MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + b"".join(self.pages[p] for p in data_pages)
        return lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)

    @classmethod
    def from_bytes(cls, blob: bytes) -> MemoryImage:
        try:
            raw = lzma.decompress(blob)
        except lzma.LZMAError as e:
            raise BadImage(f"not an xz stream: {e}") from None
        if not raw.startswith(MAGIC):
            raise BadImage(f"not a memory image (it starts {raw[:len(MAGIC)]!r})")
        try:
            end = raw.index(b"\n", len(MAGIC))
            header = json.loads(raw[len(MAGIC):end])
            return cls._from_parts(header, raw[end + 1:])
        except (ValueError, KeyError, TypeError) as e:
            if isinstance(e, BadImage):
                raise
            raise BadImage(f"damaged header: {type(e).__name__}: {e}") from None

    @classmethod
    def _from_parts(cls, header: dict, body: bytes) -> MemoryImage:
        if header.get("page_size") != PAGE_SIZE:
            raise BadImage(f"page size {header.get('page_size')}, expected {PAGE_SIZE}")
        data_pages = _unrun(header["pages"])
        if len(body) != len(data_pages) * PAGE_SIZE:
            raise BadImage(f"{len(body)} bytes of page data for {len(data_pages)} pages")
        pages = {p: body[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i, p in enumerate(data_pages)}
        pages.update((p, ZERO_PAGE) for p in _unrun(header["zero_pages"]))
        kernel = ksyms.from_json(header["kernel"])
        if kernel.version != header["kernel_version"]:
            raise BadImage(f"kernel version {header['kernel_version']} but a layout of {kernel.version}")
        return cls(kernel, header["kimage_voffset"], pages, header.get("meta", {}))

    def save(self, path: Path) -> int:
        """Write the image; returns its size in bytes."""
        blob = self.to_bytes()
        path.write_bytes(blob)
        return len(blob)

    @classmethod
    def load(cls, path: Path) -> MemoryImage:
        return cls.from_bytes(path.read_bytes())


# --- what a snapshot holds beyond to_dict() ------------------------------------------------------

VMEMMAP_SAMPLE_STRIDE = 256 * PAGE_SIZE


def _digest(items: object) -> str:
    return hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()


def _leaves(tree) -> dict | None:
    if tree is None:
        return None
    return {"count": len(tree.leaves), "tables": len(tree.tables),
            "sha256": _digest([[leaf.addr, leaf.size, leaf.level, leaf.pte] for leaf in tree.leaves])}


def _run_length(values: list) -> list[list]:
    """[a, a, a, b] -> [[3, a], [1, b]]."""
    out: list[list] = []
    for v in values:
        if out and out[-1][1] == v:
            out[-1][0] += 1
        else:
            out.append([1, v])
    return out


def _page_or_none(snap: Snapshot, pa: int) -> list[int] | None:
    """[refcount, order], or None where EL2 maps no vmemmap entry (6.1 backs only the carveout's)."""
    try:
        return list(snap.page(pa))
    except MissingPage:
        raise
    except LookupError:
        return None


def snapshot_facts(snap: Snapshot, stride: int = VMEMMAP_SAMPLE_STRIDE) -> dict:
    """The facts of a snapshot that `to_dict()` leaves out, in JSON form: per pool the
    refcount/order of every page (sums, and a hash of the whole map), the vmemmap entry of every
    `stride`-th page of each memblock (read now, through `snap.page`: on a snapshot taken with
    an image, those reads are recorded; None where EL2 maps no entry; run-length encoded as
    [[count, [refcount, order] or None], ...]), and both page tables' leaves (count, hash)."""
    pools = {}
    for name, pool in sorted(snap.pools.items()):
        pages = sorted(pool.pages.items())
        pools[name] = {"pages": len(pages), "allocated": sum(1 for _, (ref, _o) in pages if ref),
                       "refcount_sum": sum(ref for _, (ref, _o) in pages),
                       "order_sum": sum(order for _, (_r, order) in pages),
                       "sha256": _digest([[pa, ref, order] for pa, (ref, order) in pages])}
    sample = []
    for base, size, _flags in snap.memblocks:
        entries = [_page_or_none(snap, pa) for pa in range(base, base + size, stride)]
        sample.append({"base": base, "stride": stride, "entries": _run_length(entries)})
    return {"pools": pools, "vmemmap_sample": sample, "host_s2_leaves": _leaves(snap.host_s2),
            "hyp_s1_leaves": _leaves(snap.hyp_s1), "vmemmap_va": snap.vmemmap_va,
            "hyp_page_shape": snap.hyp_page_shape}
