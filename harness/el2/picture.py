"""A picture of the physical address map: host stage-2 ownership and pool occupancy.

Left: all RAM, one pixel per 4 KiB page, coloured by what the host stage-2 says (mapped memory,
not yet mapped, hyp-owned, shared) with the pools drawn over it. Right: the hyp carveout
enlarged, where the pools live, free and allocated pages apart.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")                       # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from harness.el2.pgtable import PAGE_SHIFT  # noqa: E402
from harness.el2.state import Snapshot  # noqa: E402

CATEGORIES = [  # (label, colour); the index is the pixel value
    ("not mapped in host stage-2", "#d9d9d9"),
    ("host memory (mapped)", "#74c476"),
    ("hyp-owned", "#de2d26"),
    ("shared host/hyp", "#fdd835"),
    ("hpool free", "#9ecae1"),
    ("hpool allocated", "#08519c"),
    ("host_s2_pool free", "#dadaeb"),
    ("host_s2_pool allocated", "#54278f"),
    ("VM pool free", "#fdae6b"),
    ("VM pool allocated", "#d94801"),
]


def _page_classes(snap: Snapshot, base: int, pages: int) -> np.ndarray:
    out = np.zeros(pages, dtype=np.uint8)
    for leaf in snap.host_s2.leaves if snap.host_s2 else []:
        lo, hi = max(leaf.addr, base), min(leaf.addr + leaf.size, base + (pages << PAGE_SHIFT))
        if lo >= hi:
            continue
        kind = snap.classify(leaf)
        value = {"memory": 1, "hyp-owned": 2, "shared": 3}.get(kind, 0)
        out[(lo - base) >> PAGE_SHIFT:(hi - base) >> PAGE_SHIFT] = value
    for pool in snap.pools.values():
        free_code, used_code = {"hpool": (4, 5), "host_s2_pool": (6, 7)}.get(pool.name, (8, 9))
        free: set[int] = set()
        for order, blocks in pool.free_lists.items():
            for head in blocks:
                free.update(range(head, head + (1 << (order + PAGE_SHIFT)), 1 << PAGE_SHIFT))
        for pa in range(pool.range_start, pool.range_end, 1 << PAGE_SHIFT):
            if base <= pa < base + (pages << PAGE_SHIFT):
                out[(pa - base) >> PAGE_SHIFT] = free_code if pa in free else used_code
    return out


def _square(values: np.ndarray) -> np.ndarray:
    width = 1 << math.ceil(math.log2(math.sqrt(len(values))))
    rows = math.ceil(len(values) / width)
    padded = np.zeros(rows * width, dtype=np.uint8)
    padded[: len(values)] = values
    return padded.reshape(rows, width)


def render(snap: Snapshot, path: Path) -> Path:
    cmap = ListedColormap([c for _, c in CATEGORIES])
    ram = snap.memblocks[0] if snap.memblocks else (snap.carveout[0], snap.carveout[1], 0)  # type: ignore[index]
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.5), gridspec_kw={"width_ratios": [1, 1]})
    panels = [(ram[0], ram[1], "RAM"),]
    if snap.carveout:
        panels.append((snap.carveout[0], snap.carveout[1], "hyp carveout"))
    for ax, (base, size, title) in zip(axes, panels):
        grid = _square(_page_classes(snap, base, size >> PAGE_SHIFT))
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=len(CATEGORIES) - 1, interpolation="nearest", aspect="auto")
        ax.set_title(f"{title} {base:#x}-{base + size:#x}\none pixel per 4 KiB page, {grid.shape[1]} pages a row",
                     fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([0, grid.shape[0] - 1],
                      [f"{base:#x}", f"{base + (grid.shape[0] - 1) * grid.shape[1] * 4096:#x}"])
    for ax in axes[len(panels):]:
        ax.axis("off")
    fig.legend(handles=[Patch(color=c, label=label) for label, c in CATEGORIES], loc="lower center", ncol=5,
               fontsize=8)
    fig.suptitle(f"pKVM physical memory, Linux {snap.kernel_version}: host stage-2 ownership and EL2 pools")
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
