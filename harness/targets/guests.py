"""The pkvm_guest payload driven from the host side of any target: in the foreground, or in the
background (so EL2 can be inspected while VMs live) with its progress read from a log file."""

from __future__ import annotations

import random
import re
import secrets
import time
from collections.abc import Sequence

from harness.targets.base import CommandResult, Target, TargetError


def guest_args(vms: int = 1, vcpus: int = 1, pages: int = 4, hold: int = 0, stride: int = 1,
               slots: tuple[tuple[int, int, int], ...] = (), protected: bool = False, pagemap: bool = False) -> str:
    """pkvm_guest's command line; `slots`: extra memslots as (GPA, pages, stride); `protected`:
    protected VMs; `pagemap`: print the host page behind each page the guest touched."""
    out = f"--vms {vms} --vcpus {vcpus} --pages {pages}"
    out += f" --stride {stride}" if stride != 1 else ""
    out += "".join(f" --slot {gpa:#x}:{n}:{k}" for gpa, n, k in slots)
    out += " --protected" * protected + " --pagemap" * pagemap
    return out + (f" --hold {hold}" if hold else "")


def random_workload(seed: int) -> list[str]:
    """pkvm_guest command lines drawn from `seed`: VM and vCPU counts, memslot layouts and touched
    pages (the allocator suite's randomized workload, and one the fault sweep can run)."""
    rng = random.Random(seed)

    def extra_slots() -> tuple[tuple[int, int, int], ...]:
        gpas = rng.sample([0x8000_0000, 0x9000_0000, 0x1_0000_0000, 0x2_4020_0000], rng.randint(0, 2))
        return tuple((gpa, rng.choice([1, 8, 64, 512]), rng.choice([1, 2, 7])) for gpa in gpas)

    return [guest_args(vms=rng.randint(1, 4), vcpus=rng.randint(1, 3), pages=rng.choice([2, 4, 16, 64]),
                       stride=rng.choice([1, 1, 3]), slots=extra_slots())
            for _ in range(rng.randint(3, 5))]


def guest_pages(output: str) -> dict[int, dict[int, int | None]]:
    """From pkvm_guest --pagemap's output: VM index -> {GPA: host PA (None: not present)}."""
    pages: dict[int, dict[int, int | None]] = {}
    for m in re.finditer(r"^vm=(\d+) gpa=(0x[0-9a-f]+) pa=(0x[0-9a-f]+|none)$", output, re.M):
        pages.setdefault(int(m[1]), {})[int(m[2], 16)] = None if m[3] == "none" else int(m[3], 16)
    return pages


def touch_phys(target: Target, binary: str, addrs: Sequence[int] = (),
               ranges: Sequence[tuple[int, int, int]] = ()) -> dict[int, str]:
    """Read each physical address (and each of `ranges`: (first, count, stride)) through /dev/mem
    on the target: {address: "value=0x..." or "error=..."}. The host stage-2 maps what was not
    mapped (the read faults to EL2 first)."""
    args = "".join(f" --phys {a:#x}" for a in addrs) + "".join(f" --phys {a:#x}:{n}:{k:#x}" for a, n, k in ranges)
    out = run_guests(target, binary, "--vms 0" + args).stdout
    got = {}
    for line in out.splitlines():
        if line.startswith("phys=0x"):
            addr, result = line.split(None, 1)
            got[int(addr[5:], 16)] = result
    return got


def run_guests(target: Target, binary: str, args: str, timeout: float = 300.0) -> CommandResult:
    """Run pkvm_guest to its end; a failed KVM call fails here with the payload's own error line."""
    return target.run(f"{binary} {args}", timeout=timeout).check()


class BackgroundGuests:
    """pkvm_guest running in the background: `wait("ready")` once every VM has run, then
    `wait("done")` after --hold seconds, when every VM is closed (torn down at EL2)."""

    def __init__(self, target: Target, binary: str, args: str) -> None:
        self.target = target
        self.log = f"/tmp/pkvm-guest-{secrets.token_hex(4)}.log"
        self.pid = int(target.run(f"{binary} {args} > {self.log} 2>&1 & echo $!").check().stdout.strip())

    def output(self) -> str:
        return self.target.run(f"cat {self.log}").stdout

    def wait(self, word: str, timeout: float = 120.0) -> str:
        """Until a line starts with `word`; for "done", also until the process has exited (its
        last files closed: every VM torn down at EL2)."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.output()
            if any(line.startswith(word) for line in out.splitlines()):
                # a zombie has exited too: where PID 1 is a shell (a QEMU guest over SSH) nobody reaps it
                if word != "done" or not self.target.run(
                        f"grep -qs '^State:[[:space:]]*[^Z[:space:]]' /proc/{self.pid}/status").ok:
                    return out
            if "error=" in out or "usage" in out:
                raise TargetError(f"pkvm_guest failed: {out.strip().splitlines()[-1]}")
            if time.monotonic() > deadline:
                raise TargetError(f"pkvm_guest printed no '{word}' line within {timeout:.0f}s: {out[-200:]!r}")
            time.sleep(0.3)
