"""Kernel symbols from System.map (DWARF layouts arrive with the EL2-read work)."""

from __future__ import annotations

from pathlib import Path


def read_system_map(path: Path) -> dict[str, int]:
    """name -> address. nVHE symbols keep their `__kvm_nvhe_` prefix."""
    syms: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            syms.setdefault(parts[2], int(parts[0], 16))
    return syms
