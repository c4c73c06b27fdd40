"""The hostile host: host hypercalls with any arguments, from user space of a test kernel built
with `--config pkvm-hostile-host` (the code: harness/kernel/hostile/pkvm_hostile.c), through its
debugfs files. Hypercalls are named as the kernel's enum __kvm_host_smccc_func names them (read
from DWARF: harness.el2.symbols, KernelInfo.hypercalls), so one driver serves every version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from harness.errors import UsageError
from harness.model.stage2 import MASK64
from harness.targets.base import Target

DIR = "/sys/kernel/debug/pkvm_hostile"
MAX_CALLS = 64                          # per write, as the module takes them
LINE_BUDGET = 512                       # characters of calls per shell line (a console line holds 768)
SMCCC_RET_NOT_SUPPORTED = (1 << 64) - 1


def signed(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


@dataclass(frozen=True)
class HvcResult:
    a0: int                              # the SMCCC status: 0, or SMCCC_RET_NOT_SUPPORTED
    a1: int                              # the handler's return (an int, sign-extended)
    a2: int
    a3: int

    @property
    def supported(self) -> bool:
        return self.a0 == 0

    @property
    def ret(self) -> int:
        return signed(self.a1)


@dataclass(frozen=True)
class Block:
    pfn: int
    kva: int                             # its kernel linear-map address (what a host VA argument wants)
    order: int

    @property
    def pa(self) -> int:
        return self.pfn << 12


Call = tuple[str | int, ...]             # (hypercall name or id, arguments...)


class HostileHost:
    def __init__(self, target: Target, hypercalls: dict[int, str]) -> None:
        self.target = target
        self.ids = {name: n for n, name in hypercalls.items()}

    def present(self) -> bool:
        return self.target.run(f"test -w {DIR}/hvc").ok

    def has(self, name: str) -> bool:
        return name in self.ids

    def id(self, call: str | int) -> int:
        if isinstance(call, int):
            return call
        if call not in self.ids:
            raise UsageError(f"this kernel has no host hypercall {call}",
                             hint="its enum __kvm_host_smccc_func lists: " + ", ".join(sorted(self.ids)))
        return self.ids[call]

    def calls(self, calls: Sequence[Call]) -> list[HvcResult]:
        """Issue each call in order, as many to a write as a console line holds (the module
        takes 64); their results in order."""
        lines = [" ".join(f"{a & MASK64:#x}" for a in (self.id(c[0]), *map(int, c[1:]))) + "\\n" for c in calls]
        out: list[HvcResult] = []
        while lines:
            n = 1
            while n < min(len(lines), MAX_CALLS) and sum(map(len, lines[:n + 1])) <= LINE_BUDGET:
                n += 1
            chunk, lines = lines[:n], lines[n:]
            r = self.target.run(f"printf '{''.join(chunk)}' > {DIR}/hvc && cat {DIR}/hvc").check()
            got = [HvcResult(*(int(w, 16) for w in line.split())) for line in r.stdout.splitlines() if line.strip()]
            if len(got) != len(chunk):
                raise RuntimeError(f"{len(chunk)} hypercalls written, {len(got)} results read: {r.stdout!r}")
            out += got
        return out

    def call(self, name: str | int, *args: int) -> HvcResult:
        return self.calls([(name, *args)])[0]

    def blocks(self) -> list[Block]:
        out = self.target.run(f"cat {DIR}/pages").check().stdout
        return [Block(int(p, 16), int(k, 16), int(o)) for p, k, o in (line.split() for line in out.splitlines())]

    def alloc(self, count: int, order: int = 0) -> list[Block]:
        """`count` new zeroed blocks of 2^order pages, kept by the module until freed."""
        before = {b.pfn for b in self.blocks()}
        self.target.run(f"echo alloc {count} {order} > {DIR}/pages").check()
        return [b for b in self.blocks() if b.pfn not in before]

    def free(self, block: Block) -> None:
        self.target.run(f"echo free {block.pfn:#x} > {DIR}/pages").check()
