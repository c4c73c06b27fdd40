"""`pkvm-harness report RUN_DIR...`: a run directory's result.json as Markdown (CI summaries) or
one self-contained HTML page (styles inline, the pool picture embedded).

Several run directories (a CI matrix) give one page: a table of every run first, then each run.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from harness.errors import UsageError
from harness.report.schema import problems
from harness.rundir import RESULT_SCHEMA_VERSION

KERNEL_LINE = re.compile(r"\[ *\d+\.\d{6}\] ")      # printk timestamps
BAR = 24                 # characters in a Markdown occupancy bar


@dataclass
class Run:
    dir: Path
    result: dict[str, Any]

    @property
    def title(self) -> str:
        r = self.result
        where = _where(r)
        kernel = (r.get("kernel") or {}).get("version")
        return f"{r['command']} on {where}" + (f", Linux {kernel}" if kernel else "")

    @property
    def failing(self) -> list[dict[str, Any]]:
        return [t for t in self.result.get("tests", []) if t["outcome"] in ("failed", "error")]

    def counts(self) -> str:
        s = self.result.get("summary")
        if not s or not s.get("total"):
            return self.result.get("reason") or "no tests ran"
        return ", ".join(f"{s[k]} {k}" for k in ("failed", "error", "passed", "skipped", "xfailed", "xpassed")
                         if s.get(k))


def _where(r: dict[str, Any]) -> str:
    t = r.get("target") or {}
    boot = r.get("boot") or {}
    if t.get("kind") == "ssh":
        return f"{t['name']} ({t.get('pkvm_mode') or 'pKVM'})"
    cpu = t.get("cpu") or boot.get("cpu") or "?"
    mode = t.get("pkvm_mode") or boot.get("pkvm_mode")
    return f"QEMU -cpu {cpu}" + (f" ({mode})" if mode else "")


def load(run_dir: Path) -> Run:
    """A run directory's result.json; a clear one-line UsageError for anything else."""
    path = run_dir / "result.json"
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a directory", hint="pass a run directory, e.g. runs/latest")
    if not path.is_file():
        raise UsageError(f"{run_dir} has no result.json", hint="pass a run directory that a run or a suite "
                                                              "session finished writing, e.g. runs/latest")
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not JSON ({e})", hint="the run was cut short; run it again") from None
    version = result.get("schema_version") if isinstance(result, dict) else None
    if version != RESULT_SCHEMA_VERSION:
        raise UsageError(f"{path} has schema_version {version!r}; this harness reads {RESULT_SCHEMA_VERSION}",
                         hint="render it with the harness version that wrote it")
    wrong = problems(result)
    if wrong:              # rendering would stop half-way on the first field it needs
        raise UsageError(f"{path} does not match result.schema.json: {wrong[0]}",
                         hint="it was edited or cut short; run it again")
    return Run(run_dir, result)


def occupancy_bar(pool: dict[str, Any], width: int = BAR) -> str:
    used = pool["allocated_pages"] / pool["nr_pages"] if pool["nr_pages"] else 0.0
    full = round(used * width)
    return "█" * full + "░" * (width - full)


def brief_message(test: dict[str, Any]) -> str:
    """The failure message, cut to its first two lines when it only repeats the divergence shown below it."""
    message = test.get("message", "")
    div = (test.get("evidence") or {}).get("divergence") or {}
    first = (div.get("text") or "").split("\n", 1)[0]
    if first and first in message:
        lines = message.splitlines()
        return "\n".join(lines[:2] + (["(the whole divergence is below)"] if len(lines) > 2 else []))
    return message


def _picture_uri(run: Run, test: dict[str, Any]) -> str | None:
    rel = ((test.get("evidence") or {}).get("occupancy") or {}).get("picture")
    if not rel or not (run.dir / rel).is_file():
        return None
    return "data:image/png;base64," + base64.b64encode((run.dir / rel).read_bytes()).decode()


def _environment(autoescape: bool) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("harness.report", "templates"),
                             autoescape=autoescape,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["bar"] = occupancy_bar
    env.filters["brief"] = brief_message
    env.filters["signed"] = lambda n: f"{n:+d}"
    env.filters["cell"] = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    env.tests["match_kernel"] = lambda line: bool(KERNEL_LINE.match(line))
    return env


def markdown(runs: list[Run]) -> str:
    return _environment(autoescape=False).get_template("report.md.j2").render(runs=runs)


def html(runs: list[Run]) -> str:
    pictures = {(str(r.dir), t["nodeid"]): _picture_uri(r, t) for r in runs for t in r.failing}
    return _environment(autoescape=True).get_template("report.html.j2").render(runs=runs, pictures=pictures)
