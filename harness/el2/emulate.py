"""Execute one aarch64 instruction on the debugger's side, so a breakpoint can be passed without a
single-step (pure: no I/O).

Why: in QEMU's TCG every debug stop flushes all translated code, and a single-step adds three more
flushes (step on, its stop, step off). Writing the instruction's result and the next PC through
the gdbstub instead leaves one flush per traced call. Only PC-relative ADRP is handled: it is what
hyp_get_page and hyp_put_page (most of the traffic) begin with, and it has no memory access or
flags, so its effect is exact. Anything else returns None and the caller single-steps.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1


def adrp(insn: int, pc: int) -> tuple[int, int] | None:
    """(destination register, value) if `insn` is ADRP Xd, label; else None."""
    if insn & 0x9F00_0000 != 0x9000_0000:
        return None
    immlo = (insn >> 29) & 0x3
    immhi = (insn >> 5) & 0x7_FFFF
    imm = (immhi << 2) | immlo                   # 21-bit signed page offset
    if imm & (1 << 20):
        imm -= 1 << 21
    rd = insn & 0x1F
    if rd == 31:                                 # XZR: no effect worth emulating; step instead
        return None
    return rd, ((pc & ~0xFFF) + (imm << 12)) & MASK64
