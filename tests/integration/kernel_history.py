"""A small real kernel history for the bisect test: the default 6.12 source as a base commit,
then eight commits. Most touch files that do not matter; one breaks the build and the next
fixes it; one is an allocator regression (freed blocks at the head of the free list).

Built once into the cache (about 1.5 min: `git add` of the whole tree) and reused, so the
bisect's private worktree, keyed by the repository's path, keeps a warm build directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from harness.kernel import source

COMMITS = [   # (name, file, edit, subject); "break" sits where git bisect looks first
    ("doc1", "Documentation/virt/kvm/arm/index.rst", "append", "docs: kvm/arm: trailing newline"),
    ("doc2", "README", "append", "README: spacing"),
    ("doc3", "Documentation/virt/kvm/api.rst", "append", "docs: kvm api: spacing"),
    ("break", "mm/rmap.c", "break", "mm: a commit that does not build"),
    ("fix", "mm/rmap.c", "unbreak", "mm: build again"),
    ("regression", "arch/arm64/kvm/hyp/nvhe/page_alloc.c", "head",
     "KVM: arm64: pkvm: put freed pages at the head of the free list"),
    ("doc4", "MAINTAINERS", "append", "MAINTAINERS: spacing"),
    ("doc5", "CREDITS", "append", "CREDITS: spacing"),
    # A second range (unhead..doc7) whose only bad commit hangs the boot: pKVM init deadlocks at EL2.
    ("unhead", "arch/arm64/kvm/hyp/nvhe/page_alloc.c", "tail",
     "Revert \"KVM: arm64: pkvm: put freed pages at the head of the free list\""),
    ("doc6", "Documentation/virt/kvm/arm/index.rst", "append", "docs: kvm/arm: another newline"),
    ("deadlock", "arch/arm64/kvm/hyp/nvhe/setup.c", "deadlock",
     "KVM: arm64: pkvm: take pkvm_pgd_lock early in __pkvm_init"),
    ("doc7", "CREDITS", "append", "CREDITS: more spacing"),
]
BREAK = "\n#error bisect test: this commit does not build\n"
LOCK_INIT = "\thyp_spin_lock_init(&pkvm_pgd_lock);\n"
DEADLOCK = LOCK_INIT + ("\thyp_spin_lock(&pkvm_pgd_lock);\n"
                        "\thyp_spin_lock(&pkvm_pgd_lock);\t/* bisect test: deadlock */\n")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          timeout=1800).stdout.strip()


def _edit(path: Path, how: str) -> None:
    text = path.read_text()
    new = {"append": text + "\n", "break": text + BREAK, "unbreak": text.replace(BREAK, ""),
           "head": text.replace("\tlist_add_tail(node, head);", "\tlist_add(node, head);"),
           "tail": text.replace("\tlist_add(node, head);", "\tlist_add_tail(node, head);"),
           "deadlock": text.replace(LOCK_INIT, DEADLOCK, 1)}[how]
    assert new != text, (path, how)
    path.unlink()             # the tree is hard-linked to the cached source: never write through a link
    path.write_text(new)


def kernel_history(cache_dir: Path) -> tuple[Path, dict[str, str]]:
    root = cache_dir / "bisect-history"
    revs_file = root / "revs.json"
    plan = [list(c) for c in COMMITS]
    if revs_file.is_file():
        saved = json.loads(revs_file.read_text())
        if saved.get("plan") == plan:
            return root / "repo", saved["revs"]
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    base = source.resolve(None, cache_dir, quiet=True)
    repo = root / "repo"
    subprocess.run(["cp", "-al", str(base.tree), str(repo)], check=True)
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", "harness@example.org")
    _git(repo, "config", "user.name", "pkvm-harness")
    _git(repo, "add", "-A", "-f")          # Debian's tarball .gitignore ignores everything ("/*")
    _git(repo, "commit", "-qm", f"base: Linux {base.version}")
    revs = {"base": _git(repo, "rev-parse", "HEAD")}
    for name, rel, how, subject in COMMITS:
        _edit(repo / rel, how)
        _git(repo, "add", "-A", "-f", rel)
        _git(repo, "commit", "-qm", subject)
        revs[name] = _git(repo, "rev-parse", "HEAD")
    revs_file.write_text(json.dumps({"plan": plan, "revs": revs}, indent=2) + "\n")
    return repo, revs
