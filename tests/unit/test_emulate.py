"""ADRP executed on the debugger's side must give what the CPU gives (encodings and results
from objdump of the 6.12 vmlinux)."""

from harness.el2.emulate import adrp


def test_adrp_forward_pages_as_objdump_shows_them():
    assert adrp(0xB0000902, 0xFFFF8000804858C4) == (2, 0xFFFF8000805A6000)   # hyp_put_page+0
    assert adrp(0xB00017E3, 0xFFFF8000804858C8) == (3, 0xFFFF800080782000)   # hyp_put_page+4


def test_adrp_backward_and_at_hyp_vas():
    insn = 0x90000000 | (0x7FFFF << 5) | (0x3 << 29) | 5     # adrp x5, . - 4 KiB (imm = -1)
    assert adrp(insn, 0x8000000685A38) == (5, 0x8000000684000)


def test_anything_else_is_left_to_a_single_step():
    assert adrp(0x12003C21, 0) is None        # and w1, w1, #0xffff (hyp_alloc_pages+0)
    assert adrp(0xA9BD7BFD, 0) is None        # stp x29, x30, [sp, #-48]!
    assert adrp(0x10000002, 0) is None        # adr (not adrp)
    assert adrp(0x9000001F, 0) is None        # adrp xzr: stepped, not emulated
