"""Where the harness keeps its cache and run directories."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$PKVM_HARNESS_CACHE, else $XDG_CACHE_HOME/pkvm-harness, else ~/.cache/pkvm-harness."""
    if env := os.environ.get("PKVM_HARNESS_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pkvm-harness"


def default_runs_dir() -> Path:
    """$PKVM_HARNESS_RUNS, else ./runs."""
    return Path(os.environ.get("PKVM_HARNESS_RUNS", "runs")).expanduser()
