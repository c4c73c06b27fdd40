"""The import graph of `harness` runs one way: from the CLI down to the pure parts. A module may
import its own package and anything in a lower layer; an arrow back up (or sideways between two
packages of one layer) fails here, naming the file and the import. `model/` imports nothing with I/O."""

from __future__ import annotations

import ast
from pathlib import Path

HARNESS = Path(__file__).resolve().parents[2] / "harness"

# Lowest first. A unit is a package (harness/<pkg>/) or a top-level module (harness/<mod>.py);
# harness/kernel/version.py stands alone in the base layer, as every layer asks it version facts.
LAYERS: list[set[str]] = [
    {"harness", "errors", "paths", "kernel.version"},
    {"fsutil", "procs", "progress", "verdict", "ktap", "junit"},   # small pure or OS helpers
    {"model"},                                   # pure: the reference model
    {"kernel", "targets"},                       # kernel builds; machines (QEMU, boards)
    {"image", "el2"},                            # initramfs from kernel parts; EL2 reads through targets
    {"options", "rundir", "replay", "sweep", "hostile"},  # options; run dirs; trace replay; fault sweeps; hostile mixes
    {"report"},                                  # result.json, JUnit, evidence, rendering
    {"machine"},                                 # the one assembly
    {"commands", "bisect", "doctor", "pytest_plugin"},
    {"cli"},
    {"__main__"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
PACKAGES = {p.name for p in HARNESS.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}


def unit_of(module: str) -> str:
    parts = module.split(".")[1:]              # without "harness"
    if not parts:
        return "harness"
    if parts[:2] == ["kernel", "version"]:
        return "kernel.version"
    return parts[0]


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "harness":
            if node.module == "harness":         # from harness import cli, REPO_ROOT
                found += [(node.lineno, f"harness.{a.name}" if a.name in PACKAGES or
                           (HARNESS / f"{a.name}.py").is_file() else "harness") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "harness"]
    return found


def module_name(path: Path) -> str:
    rel = path.relative_to(HARNESS.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(p)) for p in HARNESS.rglob("*.py")}
    assert units - set(RANK) == set(), "add the new module or package to LAYERS"


def test_no_import_runs_back_up_or_sideways():
    bad = []
    for path in sorted(HARNESS.rglob("*.py")):
        src = unit_of(module_name(path))
        for line, target in imports(path):
            dst = unit_of(target)
            if dst != src and RANK[dst] >= RANK[src]:
                bad.append(f"{path.relative_to(HARNESS.parent)}:{line} ({src}, layer {RANK[src]}) imports "
                           f"{target} ({dst}, layer {RANK[dst]})")
    assert not bad, "\n".join(bad)


def test_the_model_does_no_io():
    banned = {"subprocess", "socket", "os", "pathlib", "shutil", "tempfile", "qemu", "pexpect", "paramiko"}
    for path in (HARNESS / "model").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not {n.split(".")[0] for n in names} & banned, f"{path.name} imports {names}"
