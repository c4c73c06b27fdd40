"""The git side of a bisection: a private worktree and `git bisect` inside it, so the user's
checkout, index and bisect state are never touched."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

from harness.errors import InfraError, UsageError

FIRST_BAD_RE = re.compile(r"^([0-9a-f]{40}) is the first bad commit", re.MULTILINE)
ONLY_SKIPPED_RE = re.compile(r"There are only 'skip'ped commits left to test\.\nThe first bad commit could be any of:\n"
                             r"((?:[0-9a-f]{40}\n)+)")


def git(repo: Path, *args: str, check: bool = True, timeout: float = 600) -> str:
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise InfraError(f"git {' '.join(args[:3])} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return r.stdout + (r.stderr if not check else "")


def resolve(repo: Path, rev: str) -> str:
    r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise UsageError(f"{rev!r} is not a commit in {repo}", hint="give a branch, tag or commit id")
    return r.stdout.strip()


def check_range(repo: Path, good: str, bad: str) -> None:
    if good == bad:
        raise UsageError("--good and --bad are the same commit", hint="give a good commit older than the bad one")
    r = subprocess.run(["git", "-C", str(repo), "merge-base", "--is-ancestor", good, bad])
    if r.returncode != 0:
        raise UsageError(f"the good commit {good[:12]} is not an ancestor of the bad commit {bad[:12]}",
                         hint="bisect finds where good became bad: good must be older, on the same line")


def subject(repo: Path, rev: str) -> str:
    return git(repo, "log", "-1", "--format=%s", rev).strip()


def worktree_for(repo: Path, cache_dir: Path) -> Path:
    """One worktree per repository, kept between bisects so its O= build stays warm."""
    return cache_dir / "bisect" / hashlib.sha256(str(repo.resolve()).encode()).hexdigest()[:16] / "tree"


def prepare_worktree(repo: Path, tree: Path, rev: str) -> None:
    if (tree / ".git").exists():
        probe = subprocess.run(["git", "-C", str(tree), "rev-parse", "--git-dir"], capture_output=True)
        if probe.returncode == 0:
            git(tree, "bisect", "reset", check=False)
            git(tree, "checkout", "--detach", "--force", rev)
            return
        shutil.rmtree(tree)            # its repository was moved or re-made: check out afresh
    tree.parent.mkdir(parents=True, exist_ok=True)
    git(repo, "worktree", "prune")
    git(repo, "worktree", "add", "--detach", "--force", str(tree), rev, timeout=1800)


class Bisect:
    """`git bisect` in the worktree; each mark returns the next commit to test, or the end."""

    def __init__(self, tree: Path, good: str, bad: str) -> None:
        self.tree = tree
        git(tree, "bisect", "reset", check=False)
        self.last = git(tree, "bisect", "start", bad, good)

    def head(self) -> str:
        return git(self.tree, "rev-parse", "HEAD").strip()

    def mark(self, outcome: str) -> str:
        self.last = git(self.tree, "bisect", outcome, check=False)
        return self.last

    def first_bad(self) -> str | None:
        m = FIRST_BAD_RE.search(self.last)
        return m.group(1) if m else None

    def only_skipped(self) -> list[str] | None:
        m = ONLY_SKIPPED_RE.search(self.last)
        return m.group(1).split() if m else None

    def reset(self) -> None:
        git(self.tree, "bisect", "reset", check=False)
