"""The smoke suite against a real board, when one is configured:

  PKVM_HARNESS_BOARD=ssh://root@board:22  PKVM_HARNESS_BOARD_KEY=~/.ssh/id_ed25519  make test
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BOARD = os.environ.get("PKVM_HARNESS_BOARD")


@pytest.mark.skipif(not BOARD, reason="no board configured: set PKVM_HARNESS_BOARD=ssh://user@host:port "
                                      "(and PKVM_HARNESS_BOARD_KEY) to run the smoke suite on it")
def test_smoke_suite_on_the_board(tmp_path):
    args = ["--pkvm-target", BOARD, "--pkvm-run-dir", str(tmp_path)]
    if key := os.environ.get("PKVM_HARNESS_BOARD_KEY"):
        args += ["--pkvm-ssh-key", str(Path(key).expanduser())]
    r = subprocess.run([sys.executable, "-m", "pytest", str(REPO / "test_suites/smoke"), "-q",
                        "-p", "no:cacheprovider", *args], capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
