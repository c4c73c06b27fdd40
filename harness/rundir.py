"""Run directories: one per run, holding everything needed to understand it later.

  console.log    the serial console, raw
  qemu-cmd.sh    the exact QEMU command, pasteable
  kernel.config  the .config that was built
  result.json    the machine-readable verdict (schema_version 1; harness/report/result.schema.json)
  junit.xml      the same verdict for CI test views (suite runs: one testcase per test)
"""

from __future__ import annotations

import json
import os
import secrets
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from harness.fsutil import atomic_write_text

RESULT_SCHEMA_VERSION = 1


def create(runs_dir: Path, name: str | None = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = runs_dir / (name or f"{stamp}-{secrets.token_hex(3)}")
    run_dir.mkdir(parents=True, exist_ok=False)
    latest = runs_dir / "latest"
    try:
        tmp = runs_dir / f".latest.{os.getpid()}"
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, latest)
    except OSError:
        pass  # a convenience only
    return run_dir


def write_qemu_command(run_dir: Path, shell_line: str) -> Path:
    path = run_dir / "qemu-cmd.sh"
    atomic_write_text(path, "#!/bin/sh\n# The QEMU command of this run; paste it to boot the same machine.\n"
                            f"{shell_line}\n")
    path.chmod(0o755)
    return path


def write_result(run_dir: Path, result: dict) -> Path:
    path = run_dir / "result.json"
    atomic_write_text(path, json.dumps({"schema_version": RESULT_SCHEMA_VERSION, **result}, indent=2) + "\n")
    return path


def _write_junit(run_dir: Path, root: ET.Element) -> Path:
    path = run_dir / "junit.xml"
    atomic_write_text(path, '<?xml version="1.0" encoding="utf-8"?>' + ET.tostring(root, encoding="unicode") + "\n")
    return path


def write_suite_junit(run_dir: Path, result: dict) -> Path:
    """A suite run (result.json's `tests`) as JUnit: one testcase per test, classname from its
    file as pytest's own writer names it (test_suites.allocator.test_allocator)."""
    root = ET.Element("testsuites", name="pkvm-harness")
    counts = result["summary"]
    suite = ET.SubElement(root, "testsuite", name="pkvm-harness suites", tests=str(counts["total"]),
                          failures=str(counts["failed"]), errors=str(counts["error"]),
                          skipped=str(counts["skipped"] + counts["xfailed"]), time=f"{result['duration_s']:.3f}")
    for t in result["tests"]:
        path, _, name = t["nodeid"].partition("::")
        case = ET.SubElement(suite, "testcase", classname=path.removesuffix(".py").replace("/", "."),
                             name=name, time=f"{t['duration_s']:.3f}")
        kind = {"failed": "failure", "error": "error", "skipped": "skipped", "xfailed": "skipped"}.get(t["outcome"])
        if kind:
            message = t.get("message", "")
            node = ET.SubElement(case, kind, message=message.splitlines()[0] if message else "")
            node.text = message
    return _write_junit(run_dir, root)


def write_run_junit(run_dir: Path, result: dict) -> Path:
    """A `run` or `trace` as one JUnit testcase: failed (a verdict) or errored (the harness could not judge)."""
    root = ET.Element("testsuites", name="pkvm-harness")
    seconds = f"{result.get('duration_s', 0):.3f}"
    suite = ET.SubElement(root, "testsuite", name=f"pkvm-harness {result.get('command', 'run')}", tests="1",
                          time=seconds, failures="0", errors="0", skipped="0")
    name = f"{result.get('command', 'run')}[{result.get('stage', '?')}]"
    case = ET.SubElement(suite, "testcase", classname="pkvm-harness", name=name,
                         time=seconds)
    if result.get("exit_code", 0) != 0:
        kind = "error" if result.get("outcome") in ("error", "interrupted") else "failure"
        suite.set("errors" if kind == "error" else "failures", "1")
        node = ET.SubElement(case, kind, message=result.get("reason", ""), type=result.get("outcome", "fail"))
        node.text = "\n\n".join(["\n".join(e["excerpt"]) for e in result.get("events", [])]
                                + [(result.get("divergence") or {}).get("text", "")]).strip()
    return _write_junit(run_dir, root)
