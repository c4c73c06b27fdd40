"""Find the kernel source to build and say exactly which source it is.

The identity string feeds the build cache key: a git commit plus a hash of any uncommitted
change, the hash of a tarball, or a hash of a plain tree's file list.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import InfraError, UsageError
from harness.fsutil import atomic_dir, atomic_write_text, file_lock, sha256_file
from harness.kernel import debian
from harness.kernel.version import KernelVersion
from harness.procs import die_with_parent
from harness.progress import Progress

TARBALL_SUFFIXES = (".tar.xz", ".tar.gz", ".tar.bz2", ".tar", ".tgz")
# A file only pKVM kernels have: its presence says the tree can run protected mode at all.
PKVM_MARKER = Path("arch/arm64/kvm/hyp/nvhe/page_alloc.c")


@dataclass(frozen=True)
class KernelSource:
    tree: Path        # what `make -C` gets; never written to (builds use O=)
    identity: str     # stable id of the exact source content
    version: str      # e.g. "6.12.117"
    origin: str       # what the user gave, for reports
    # Puts this source's content into `tree` (re-patched trees, harness.kernel.source.with_patches);
    # build() calls it under the build lock, just before make.
    checkout: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    # The identity of what userspace builds see (tools/ and uapi headers): a patch set that
    # touches neither shares the guest payloads of the unpatched source.
    userspace_identity: str = ""
    # Kconfig symbols the patches define: known before the patched tree is checked out
    added_symbols: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.userspace_identity:
            object.__setattr__(self, "userspace_identity", self.identity)

    @property
    def kernel_version(self) -> KernelVersion:
        """`version` as a KernelVersion: ask it the version facts (e.g. `.series`, `.selftests_arch`)."""
        return KernelVersion.parse(self.version)


def resolve(kernel_src: Path | None, cache_dir: Path, *, quiet: bool = False,
            kernel: str | None = None) -> KernelSource:
    """Resolve --kernel-src (a tree or a tarball), --kernel X.Y (a Debian tarball), or the default."""
    if kernel_src is not None and kernel is not None:
        raise UsageError("--kernel and --kernel-src both name the source", hint="give one of them")
    if kernel_src is None:
        return _from_tarball(debian.tarball(kernel or debian.DEFAULT, cache_dir, quiet=quiet), cache_dir, quiet=quiet)
    path = kernel_src.expanduser()
    if not path.exists():
        raise UsageError(f"--kernel-src {kernel_src} does not exist",
                         hint="pass the root of a Linux kernel tree, or a linux-source tarball")
    path = path.resolve()
    if path.is_file():
        if not path.name.endswith(TARBALL_SUFFIXES):
            raise UsageError(f"--kernel-src {path} is a file but not a tarball",
                             hint="pass a kernel tree directory or a .tar.xz/.tar.gz source tarball")
        return _from_tarball(path, cache_dir, quiet=quiet)
    return _from_tree(path)


def check_linux_tree(tree: Path) -> str:
    """Validate a tree and return its kernel version; raise a UsageError that says what to do."""
    makefile = tree / "Makefile"
    version = _makefile_version(makefile) if makefile.is_file() else None
    if version is None or not (tree / "Kconfig").is_file() or not (tree / "arch/arm64").is_dir():
        raise UsageError(f"{tree} is not a Linux kernel tree (no top-level Makefile with VERSION, "
                         "Kconfig and arch/arm64)",
                         hint="pass the root of a kernel checkout to --kernel-src")
    if not (tree / PKVM_MARKER).is_file():
        raise UsageError(f"{tree} (Linux {version}) has no {PKVM_MARKER}, so it cannot run pKVM",
                         hint="use Linux 5.13 or later")
    for leftover in (".config", "include/config/auto.conf", "include/generated"):
        if (tree / leftover).exists():
            raise UsageError(f"{tree} holds in-tree build output ({leftover}); the harness builds "
                             "with O= and kbuild refuses an unclean source tree",
                             hint=f"run `make -C {tree} mrproper` or pass a clean checkout")
    return version


def _makefile_version(makefile: Path) -> str | None:
    fields: dict[str, str] = {}
    with open(makefile, errors="replace") as f:
        for _, line in zip(range(20), f):
            m = re.match(r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION)\s*=\s*(\S*)", line)
            if m:
                fields[m.group(1)] = m.group(2)
    if not fields.get("VERSION", "").isdigit():
        return None
    version = f"{fields['VERSION']}.{fields.get('PATCHLEVEL', '0')}"
    if fields.get("SUBLEVEL", "0") not in ("", "0"):
        version += f".{fields['SUBLEVEL']}"
    return version + fields.get("EXTRAVERSION", "")


def _from_tree(tree: Path) -> KernelSource:
    version = check_linux_tree(tree)
    if (tree / ".git").exists():
        identity = _git_identity(tree)
        userspace = _git_userspace_identity(tree, identity)
    else:
        identity = userspace = "tree:" + _tree_listing_hash(tree)
    return KernelSource(tree=tree, identity=identity, version=version, origin=str(tree),
                        userspace_identity=userspace)


# What the guest payloads are built from: the selftests and tools, and the uapi headers.
USERSPACE_PATHS = ("tools", "include/uapi", "arch/arm64/include/uapi")


def _git_userspace_identity(tree: Path, identity: str) -> str:
    """The git tree ids of USERSPACE_PATHS: commits that change only the kernel (bisect steps)
    share one payload build. A dirty tree keeps its full identity."""
    if "+dirty:" in identity:
        return identity
    ids = []
    for path in USERSPACE_PATHS:
        r = subprocess.run(["git", "-C", str(tree), "rev-parse", "--verify", "--quiet", f"HEAD:{path}"],
                           capture_output=True, text=True, env=dict(os.environ, GIT_OPTIONAL_LOCKS="0"))
        ids.append(r.stdout.strip() or "-")
    return "git-userspace:" + hashlib.sha256(" ".join(ids).encode()).hexdigest()[:16]


def _git(tree: Path, *args: str) -> bytes:
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # reading must not rewrite the user's index
    try:
        return subprocess.run(["git", "-C", str(tree), *args], check=True, env=env,
                              capture_output=True).stdout
    except FileNotFoundError:
        raise UsageError("git is not installed", hint="run `make setup`") from None
    except subprocess.CalledProcessError as e:
        raise UsageError(f"git {' '.join(args)} failed in {tree}: "
                         f"{e.stderr.decode(errors='replace').strip()}",
                         hint="check that --kernel-src is a healthy git checkout") from None


def _git_identity(tree: Path) -> str:
    """Commit id, plus a hash of tracked changes and untracked files if the tree is dirty."""
    commit = _git(tree, "rev-parse", "HEAD").decode().strip()
    h = hashlib.sha256()
    diff = _git(tree, "diff", "HEAD", "--binary")
    h.update(diff)
    untracked = [p for p in _git(tree, "ls-files", "-o", "--exclude-standard", "-z").split(b"\0") if p]
    for rel in sorted(untracked):
        h.update(rel + b"\0")
        f = tree / rel.decode(errors="surrogateescape")
        if f.is_file():
            h.update(hashlib.sha256(f.read_bytes()).digest())
    if diff or untracked:
        return f"git:{commit}+dirty:{h.hexdigest()[:16]}"
    return f"git:{commit}"


def _tree_listing_hash(tree: Path) -> str:
    """Hash of every file's path, size and mtime: a plain tree has no better identity."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(tree):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            h.update(f"{os.path.relpath(p, tree)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _tarball_sha256(tarball: Path, cache_dir: Path) -> str:
    """sha256 of a tarball, remembered by (path, size, mtime) so warm runs do not rehash."""
    memo_path = cache_dir / "src" / "tarball-ids.json"
    st = tarball.stat()
    key = f"{tarball}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (FileNotFoundError, ValueError):
        memo = {}
    if key not in memo:
        memo[key] = sha256_file(tarball)
        atomic_write_text(memo_path, json.dumps(memo, indent=1))
    return memo[key]


def _from_tarball(tarball: Path, cache_dir: Path, *, quiet: bool) -> KernelSource:
    digest = _tarball_sha256(tarball, cache_dir)
    stem = tarball.name
    for suffix in TARBALL_SUFFIXES:
        stem = stem.removesuffix(suffix)
    entry = cache_dir / "src" / f"{stem}-{digest[:12]}"
    with file_lock(cache_dir / "src" / f".{entry.name}.lock"):
        if not entry.is_dir():
            progress = Progress("unpack", quiet=quiet)
            progress.note(f"unpacking {tarball} into {entry} (once)")
            with atomic_dir(entry) as tmp:
                r = subprocess.run(["tar", "-xf", str(tarball), "-C", str(tmp)],
                                   capture_output=True, text=True, preexec_fn=die_with_parent())
                if r.returncode != 0:
                    raise InfraError(f"could not unpack {tarball}: {r.stderr.strip()[:300]}",
                                     hint="check the tarball and free disk space")
            progress.done("unpacked")
    children = [c for c in entry.iterdir() if c.is_dir()]
    tree = children[0] if len(children) == 1 else entry
    version = check_linux_tree(tree)
    return KernelSource(tree=tree, identity=f"tarball:{digest}", version=version,
                        origin=str(tarball))


def with_patches(source: KernelSource, patches: list[Path], cache_dir: Path, *, quiet: bool = False) -> KernelSource:
    """The source with `patches` applied (patch -p1, in order), in one re-patched copy per source.

    Every patch set of a source shares one tree, so it shares one O= directory: switching patch
    sets (mutants, bisect steps) rebuilds only the files they touch. The copy is made of hard links
    (`cp -al`), once; `patch` writes each file it changes anew, so the original is never modified.
    The identity is the original's plus the patches' hash, so each patch set's kernel is cached
    apart. The patches go into the tree only when a build needs it (`checkout`, called under the
    build lock); they are tried on a scratch copy of the files they touch here, so a patch that
    does not apply is refused before anything is built.
    """
    if not patches:
        return source
    h = hashlib.sha256()
    for patch in patches:
        if not patch.is_file():
            raise UsageError(f"--patch {patch} does not exist", hint="pass a unified diff for `patch -p1`")
        h.update(patch.read_bytes())
    digest = h.hexdigest()[:16]
    base_key = hashlib.sha256(source.identity.encode()).hexdigest()[:12]
    root = cache_dir / "src" / f"patched-{base_key}"
    with file_lock(cache_dir / "src" / f".{root.name}.lock"):
        if not root.is_dir():
            Progress("patch", quiet=quiet).note(f"making a re-patchable copy of {source.tree}")
            with atomic_dir(root) as tmp:
                r = subprocess.run(["cp", "-al", str(source.tree), str(tmp / "tree")], capture_output=True, text=True)
                if r.returncode != 0:
                    raise InfraError(f"could not copy {source.tree}: {r.stderr.strip()[:200]}",
                                     hint="hard links need the cache on the same file system as the tree")
    _dry_run(source.tree, patches)
    resolved = [p.resolve() for p in patches]
    identity = f"{source.identity}+patches:{digest}"
    kernel_only = not any(rel.startswith("tools/") or "/uapi/" in rel for p in patches for rel in patched_files(p))
    return KernelSource(tree=root / "tree", identity=identity,
                        version=source.version, origin=f"{source.origin} + {', '.join(p.name for p in patches)}",
                        checkout=lambda: _checkout(source.tree, root, resolved, digest),
                        userspace_identity=source.userspace_identity if kernel_only else identity,
                        added_symbols=tuple(sym for p in patches for sym in added_symbols(p)))


_ADDED_SYMBOL_RE = re.compile(r"^\+\s*(?:menu)?config\s+([A-Za-z0-9_]+)\s*$", re.MULTILINE)


def added_symbols(patch: Path) -> list[str]:
    """The Kconfig symbols a unified diff defines ("+config FOO" lines)."""
    return _ADDED_SYMBOL_RE.findall(patch.read_text(errors="replace"))


def patched_files(patch: Path) -> list[str]:
    """Paths (relative to the tree) a -p1 unified diff creates, changes or deletes."""
    out: list[str] = []
    for line in patch.read_text(errors="replace").splitlines():
        if line.startswith(("--- ", "+++ ")):
            path = line[4:].split("\t")[0].strip()
            if path != "/dev/null" and "/" in path:
                rel = path.split("/", 1)[1]
                if rel not in out:
                    out.append(rel)
    return out


def _apply(tree: Path, patch: Path) -> None:
    r = subprocess.run(["patch", "-p1", "--batch", "--forward", "-d", str(tree), "-i", str(patch)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise UsageError(f"--patch {patch.name} does not apply: {(r.stdout + r.stderr).strip().splitlines()[-1][:200]}",
                         hint="rebase the patch onto this kernel version")


def _dry_run(pristine: Path, patches: list[Path]) -> None:
    """Apply the patches to a scratch copy of just the files they touch."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pkvm-patch-") as tmp:
        scratch = Path(tmp)
        for patch in patches:
            for rel in patched_files(patch):
                src, dst = pristine / rel, scratch / rel
                if src.is_file() and not dst.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    dst.write_bytes(src.read_bytes())
        for patch in patches:
            _apply(scratch, patch.resolve())


def _checkout(pristine: Path, root: Path, patches: list[Path], digest: str) -> None:
    """Make root/tree hold exactly pristine + patches. Files the previous patch set touched are
    restored as fresh copies (a new mtime, so kbuild rebuilds them); the record is written
    before the tree changes, so an interrupted checkout is undone by the next one."""
    tree, record = root / "tree", root / "applied.json"
    state = json.loads(record.read_text()) if record.is_file() else {"digest": None, "files": []}
    if state["digest"] == digest:
        return
    wanted = [rel for p in patches for rel in patched_files(p)]
    atomic_write_text(record, json.dumps({"digest": None, "files": sorted(set(state["files"]) | set(wanted))}))
    for rel in state["files"]:
        dst, src = tree / rel, pristine / rel
        dst.unlink(missing_ok=True)
        if src.is_file():
            dst.write_bytes(src.read_bytes())
    for patch in patches:
        _apply(tree, patch)
    atomic_write_text(record, json.dumps({"digest": digest, "files": sorted(set(wanted))}))
