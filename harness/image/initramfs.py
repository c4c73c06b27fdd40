"""Assemble the pKVM host's initramfs: busybox, /dev/console and a rendered /init.

Images are content-addressed in the cache (initramfs/<sha256>.cpio), so a run records exactly
which image it booted and equal inputs give equal bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import jinja2

from harness import REPO_ROOT
from harness.fsutil import atomic_write_bytes
from harness.image import debs
from harness.image.cpio import Entry, write_newc
from harness.image.keys import ensure_keys
from harness.image.payloads import GUEST_DIR, Payloads

READY_MARKER = "PKVM-HARNESS-READY"
PROMPT = "pkvm-host# "
TEMPLATE_DIR = REPO_ROOT / "rootfs"


@dataclass(frozen=True)
class Initramfs:
    path: Path
    sha256: str
    packages: tuple[str, ...]   # .deb file names it was made from


def render_init(ready_marker: str = READY_MARKER, prompt: str = PROMPT, hostname: str = "pkvm-host") -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    return env.get_template("init.j2").render(ready_marker=ready_marker, prompt=prompt, hostname=hostname)


def entries(cache_dir: Path, payloads: Payloads | None = None) -> tuple[list[Entry], tuple[str, ...]]:
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
    for pkg in debs.read_package_list():
        deb = debs.fetch_deb(pkg.package, cache_dir)
        used.append(deb.name)
        for path, (data, perm) in debs.extract(deb, pkg.files).items():
            items.append(Entry.file(path, data, perm))
    return items, tuple(used)


def build_initramfs(cache_dir: Path, payloads: Payloads | None = None) -> Initramfs:
    """The image; with `payloads`, also the guest programs under /opt/pkvm-harness/bin."""
    items, used = entries(cache_dir, payloads)
    data = write_newc(items)
    digest = hashlib.sha256(data).hexdigest()
    path = cache_dir / "initramfs" / f"{digest[:24]}.cpio"
    if not path.is_file():
        atomic_write_bytes(path, data)
    return Initramfs(path, digest, used)
