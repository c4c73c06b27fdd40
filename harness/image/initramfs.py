"""Assemble the pKVM host's initramfs: busybox, /dev/console and a rendered /init.

Images are content-addressed in the cache (initramfs/<sha256>.cpio), so a run records exactly
which image it booted and equal inputs give equal bytes.

Making an image extracts every .deb of rootfs/packages.txt (a `dpkg-deb` each) and hashes the
result, so a finished image is also indexed by a digest of its inputs: initramfs/index/<key>.json
holds the image's file name, its content sha256 and the size and mtime it had when written. A
warm call hashes a few small input files, stats the .debs and payloads, reads that record and
stats the image: nothing is extracted or hashed again. An image whose size or mtime no longer
match its record (edited, truncated, replaced or missing) is never served: it is rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from harness import REPO_ROOT
from harness.fsutil import atomic_write_bytes, atomic_write_text, file_lock, sha256_file
from harness.image import cpio, debs
from harness.image.payloads import GUEST_DIR, Payloads

READY_MARKER = "PKVM-HARNESS-READY"
PROMPT = "pkvm-host# "
HOSTNAME = "pkvm-host"
TEMPLATE_DIR = REPO_ROOT / "rootfs"
# Bump when what goes into an image changes in a way the hashed inputs below do not show.
INDEX_SCHEMA = 1
# The code that decides an image's bytes: a change to it is a change of input.
_CODE = (Path(__file__), Path(cpio.__file__), Path(debs.__file__))
# harness/image/keys.py's files that go into the image (read directly: keys.py imports
# `cryptography`, needed only to make the keys the first time).
_KEY_FILES = ("harness_ed25519.pub", "dropbear_ed25519_host")


@dataclass(frozen=True)
class Initramfs:
    path: Path
    sha256: str
    packages: tuple[str, ...]   # .deb file names it was made from


def render_init(ready_marker: str = READY_MARKER, prompt: str = PROMPT, hostname: str = HOSTNAME) -> str:
    import jinja2  # only when an image is made (a warm run finds it in the index)

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    return env.get_template("init.j2").render(ready_marker=ready_marker, prompt=prompt, hostname=hostname)


def entries(cache_dir: Path, payloads: Payloads | None = None) -> tuple[list[cpio.Entry], tuple[str, ...]]:
    from harness.image.keys import ensure_keys

    Entry = cpio.Entry
    keys = ensure_keys(cache_dir)
    items = [
        Entry.file("init", render_init().encode(), 0o755),
        # The kernel opens /dev/console for PID 1 before devtmpfs is mounted.
        Entry.chardev("dev/console", 5, 1),
        Entry.directory("proc"), Entry.directory("sys"), Entry.directory("tmp", 0o1777),
        Entry.directory("root", 0o700), Entry.directory("etc"),
        Entry.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        Entry.file("etc/group", b"root:x:0:\n"),
        Entry.file("etc/shells", b"/bin/sh\n"),
        Entry.symlink("bin/sh", "busybox"),
        # SSH: the harness's client key may log in as root; the host key was made on the host.
        Entry.directory("root/.ssh", 0o700),
        Entry.file("root/.ssh/authorized_keys", (keys.client_public_line + "\n").encode(), 0o600),
        Entry.file("etc/dropbear/dropbear_ed25519_host_key", keys.host_private.read_bytes(), 0o600),
    ]
    if payloads:
        for name in payloads.names():
            items.append(Entry.file(f"{GUEST_DIR.lstrip('/')}/{name}", payloads.path(name).read_bytes(), 0o755))
    used = []
    for pkg in debs.read_package_list(debs.PACKAGES_FILE):
        deb = debs.fetch_deb(pkg.package, cache_dir)
        used.append(deb.name)
        for path, (data, perm) in debs.extract(deb, pkg.files).items():
            items.append(Entry.file(path, data, perm))
    return items, tuple(used)


def inputs_key(cache_dir: Path, payloads: Payloads | None = None) -> str | None:
    """A digest of everything an image is made from, or None when an input is not in the cache
    yet (the keys, a .deb): then the image has to be made, and that fetches it.

    Hashed: the schema, the code that writes images, the /init template(s) and what they are
    rendered with, rootfs/packages.txt, the keys. Stat'ed: each .deb (name, size, mtime) and each
    payload (name, size, mtime; payload directories are written once, atomically).
    """
    h = hashlib.sha256(f"initramfs index {INDEX_SCHEMA}\0{READY_MARKER}\0{PROMPT}\0{HOSTNAME}\0".encode())

    def add_file(label: str, path: Path) -> None:
        data = path.read_bytes()
        h.update(f"{label}\0{len(data)}\0".encode() + data)

    for path in _CODE:
        add_file(f"code {path.name}", path)
    for path in sorted(TEMPLATE_DIR.glob("*.j2")):
        add_file(f"template {path.name}", path)
    add_file("packages", debs.PACKAGES_FILE)
    try:
        for name in _KEY_FILES:
            add_file(f"key {name}", cache_dir / "keys" / name)
    except FileNotFoundError:
        return None
    cached = debs.cached_debs(cache_dir)
    for pkg in debs.read_package_list(debs.PACKAGES_FILE):
        deb = cached.get(pkg.package)
        if deb is None:
            return None
        st = deb.stat()
        h.update(f"deb {deb.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    if payloads:
        h.update(f"payloads {payloads.dir}\0".encode())
        for name in payloads.names():
            st = payloads.path(name).stat()
            h.update(f"payload {name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:32]


def _index_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "initramfs" / "index" / f"{key}.json"


def _lookup(cache_dir: Path, key: str) -> Initramfs | None:
    """The indexed image for `key`, if its record is sound and the image is as it was written."""
    try:
        rec = json.loads(_index_path(cache_dir, key).read_text())
        path = cache_dir / "initramfs" / rec["file"]
        st = path.stat()
        if (st.st_size, st.st_mtime_ns) != (rec["size"], rec["mtime_ns"]) or path.name != f"{rec['sha256'][:24]}.cpio":
            return None
        return Initramfs(path, rec["sha256"], tuple(rec["packages"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _record(cache_dir: Path, key: str, img: Initramfs) -> None:
    st = img.path.stat()
    rec = {"file": img.path.name, "sha256": img.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
           "packages": list(img.packages)}
    atomic_write_text(_index_path(cache_dir, key), json.dumps(rec, indent=1) + "\n")


def _make(cache_dir: Path, payloads: Payloads | None) -> Initramfs:
    items, used = entries(cache_dir, payloads)
    data = cpio.write_newc(items)
    digest = hashlib.sha256(data).hexdigest()
    path = cache_dir / "initramfs" / f"{digest[:24]}.cpio"
    # An image already there is kept only if it holds exactly these bytes (rewriting a good one
    # would change its mtime under other index records); a damaged one is replaced.
    with contextlib.suppress(OSError):
        if path.stat().st_size == len(data) and sha256_file(path) == digest:
            return Initramfs(path, digest, used)
    atomic_write_bytes(path, data)
    return Initramfs(path, digest, used)


def build_initramfs(cache_dir: Path, payloads: Payloads | None = None) -> Initramfs:
    """The image; with `payloads`, also the guest programs under /opt/pkvm-harness/bin."""
    key = inputs_key(cache_dir, payloads)
    if key is not None and (img := _lookup(cache_dir, key)) is not None:
        return img
    (cache_dir / "initramfs").mkdir(parents=True, exist_ok=True)
    with file_lock(cache_dir / "initramfs" / ".lock"):
        before = inputs_key(cache_dir, payloads)
        if before is not None and (img := _lookup(cache_dir, before)) is not None:
            return img                      # another run made it while we waited
        img = _make(cache_dir, payloads)
        # Making it may have fetched inputs that had no key yet (keys, .debs); an input that
        # changed while it was made leaves it unrecorded.
        after = inputs_key(cache_dir, payloads)
        if after is not None and before in (None, after):
            _record(cache_dir, after, img)
        return img
