"""A newc ("070701") cpio writer for initramfs images.

Written in Python so images need neither root nor loop mounts, and so that the same entries
always give the same bytes: fixed inode numbers, mtime 0, owner root, sorted paths.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import PurePosixPath

TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    path: str            # inside the image, without a leading slash: "bin/busybox"
    mode: int            # full st_mode, type bits included
    data: bytes = b""    # file contents, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)

    @staticmethod
    def directory(path: str, perm: int = 0o755) -> Entry:
        return Entry(path, stat.S_IFDIR | perm)

    @staticmethod
    def file(path: str, data: bytes, perm: int = 0o644) -> Entry:
        return Entry(path, stat.S_IFREG | perm, data)

    @staticmethod
    def symlink(path: str, target: str) -> Entry:
        return Entry(path, stat.S_IFLNK | 0o777, target.encode())

    @staticmethod
    def chardev(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
        return Entry(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, e: Entry, namesize: int) -> bytes:
    fields = (ino, e.mode, 0, 0, 2 if stat.S_ISDIR(e.mode) else 1, 0, len(e.data),
              0, 0, e.rdev[0], e.rdev[1], namesize, 0)
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def _with_parents(entries: list[Entry]) -> list[Entry]:
    """Add any missing parent directories and order parents before children."""
    by_path: dict[str, Entry] = {}
    for e in entries:
        path = str(PurePosixPath(e.path.lstrip("/")))
        if path in by_path:
            raise ValueError(f"duplicate cpio entry {path!r}")
        by_path[path] = Entry(path, e.mode, e.data, e.rdev)
    for path in list(by_path):
        for parent in PurePosixPath(path).parents:
            p = str(parent)
            if p != "." and p not in by_path:
                by_path[p] = Entry.directory(p)
    return [by_path[p] for p in sorted(by_path, key=lambda p: PurePosixPath(p).parts)]


def write_newc(entries: list[Entry]) -> bytes:
    out = bytearray()
    for ino, e in enumerate(_with_parents(entries), start=1):
        name = e.path.encode() + b"\0"
        header = _header(ino, e, len(name))
        out += header + name + _pad4(len(header) + len(name))
        out += e.data + _pad4(len(e.data))
    trailer = Entry(TRAILER, 0)
    name = TRAILER.encode() + b"\0"
    header = _header(0, trailer, len(name))
    out += header + name + _pad4(len(header) + len(name))
    return bytes(out)
