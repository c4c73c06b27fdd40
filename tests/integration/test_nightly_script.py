"""ci/nightly.sh as CI calls it: bad usage, and a kernel git URL that is fetched and handed to the
harness (a repository that is not Linux must be refused by the harness with its usage code). The
full run is `make test`'s last step (ci/nightly.sh --cpu max)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _nightly(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "ci" / "nightly.sh"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "CI": "true", **(env or {})})


def test_bad_usage_is_one_line_and_exit_2():
    r = _nightly("--frobnicate")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "unknown argument '--frobnicate'" in r.stderr
    r = _nightly("--kernel-src", "/x", "--kernel-git", "file:///y")
    assert r.returncode == 2 and "not both" in r.stderr


def test_a_kernel_git_url_is_fetched_and_given_to_the_harness(tmp_path):
    repo = tmp_path / "not-linux"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / "README").write_text("not a kernel\n")
    subprocess.run(git + ["add", "README"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "one"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    cache = tmp_path / "cache"
    r = _nightly("--kernel-git", repo.as_uri(), "--kernel-ref", "main", "--out", str(tmp_path / "out"),
                 env={"PKVM_HARNESS_CACHE": str(cache)})
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"nightly: kernel at {head}" in r.stdout
    assert "is not a Linux kernel tree" in r.stderr, r.stderr[-1000:]
    fetched = list((cache / "nightly-src").iterdir())
    assert len(fetched) == 1 and (fetched[0] / "README").read_text() == "not a kernel\n"
