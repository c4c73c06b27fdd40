"""The hypervisor's trace remote (7.x with NVHE_EL2_DEBUG): /sys/kernel/tracing/remotes/hypervisor/,
read through any target's shell, so on QEMU and on boards alike.

The hypervisor writes its events (hyp_enter, hyp_exit, selftest) into ring buffers the host maps;
tracefs prints each as "[CPU]\tSECONDS.MICROS: name fields" (kernel/trace/trace_remote.c; e.g.
"[001]\t    2.760948: hyp_exit reason=eret_guest vcpu=148", the vcpu field a host thread's pid).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from harness.targets.base import Shell, TargetError

TRACEFS = "/sys/kernel/tracing"
REMOTE = f"{TRACEFS}/remotes/hypervisor"
LINE_RE = re.compile(r"^\[(\d+)\]\s+(\d+)\.(\d+): (\w+):? ?(.*)$")


@dataclass(frozen=True)
class HypEvent:
    cpu: int
    time_us: int
    name: str
    fields: dict[str, str]

    @classmethod
    def parse(cls, line: str) -> HypEvent | None:
        m = LINE_RE.match(line.strip())
        if m is None:
            return None
        fields = dict(kv.split("=", 1) for kv in m[5].split() if "=" in kv)
        return cls(int(m[1]), int(m[2]) * 1_000_000 + int(m[3]), m[4], fields)


class HypTraceRemote:
    """Enable events, read what the hypervisor recorded. `present()` is False on kernels without
    the remote (before 7.x, or built with --el2-debug off)."""

    def __init__(self, shell: Shell) -> None:
        self.shell = shell

    def _run(self, cmd: str) -> str:
        return self.shell.run(cmd, timeout=30).check().stdout

    def present(self) -> bool:
        self.shell.run(f"mountpoint -q {TRACEFS} || mount -t tracefs tracefs {TRACEFS}", timeout=30)
        return self.shell.run(f"test -d {REMOTE}", timeout=30).ok

    def _event_dirs(self) -> dict[str, str]:
        """event name -> its directory under events/ (grouped by system, as in ftrace: hypervisor/)."""
        out = self._run(f"cd {REMOTE}/events && ls -d */*/")
        return {path.rstrip("/").split("/")[-1]: path.rstrip("/") for path in out.split()}

    def events(self) -> list[str]:
        return sorted(self._event_dirs())

    def start(self, events: tuple[str, ...] = ("hyp_enter", "hyp_exit"), buffer_kb: int | None = None) -> None:
        """Clear the buffers, enable `events`, turn tracing on. `buffer_kb`: each CPU's buffer
        (7 KiB by default: a few hundred events); it can change only while the buffers are unloaded,
        which clearing them with tracing off does."""
        dirs = self._event_dirs()
        missing = set(events) - set(dirs)
        if missing:
            raise TargetError(f"the hypervisor's trace remote has no event {', '.join(sorted(missing))}")
        cmds = [f"echo 0 > {REMOTE}/tracing_on", f"echo > {REMOTE}/trace"]
        if buffer_kb is not None:
            cmds.append(f"echo {buffer_kb} > {REMOTE}/buffer_size_kb")
        cmds += [f"echo 1 > {REMOTE}/events/{dirs[name]}/enable" for name in events]
        self._run(" && ".join([*cmds, f"echo 1 > {REMOTE}/tracing_on"]))

    def tracing(self, buffer_kb: int) -> bool:
        """Tracing is on, into loaded buffers of `buffer_kb` per CPU."""
        on = self.shell.run(f"cat {REMOTE}/tracing_on {REMOTE}/buffer_size_kb", timeout=30).stdout.split()
        return on[:3] == ["1", str(buffer_kb), "(loaded)"]

    def stop(self) -> None:
        self._run(f"echo 0 > {REMOTE}/tracing_on")

    def read(self) -> tuple[str, list[HypEvent]]:
        """The buffers' text as tracefs prints it (kept as evidence) and its events."""
        text = self._run(f"cat {REMOTE}/trace")
        return text, [e for e in map(HypEvent.parse, text.splitlines()) if e is not None]
