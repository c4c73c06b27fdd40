"""The kernel's error returns the models predict, and how findings name them (pure)."""

from __future__ import annotations

EPERM, ENOENT, ENOMEM, EBUSY, EINVAL = -1, -2, -12, -16, -22
NAMES = {0: "0", EPERM: "-EPERM", ENOENT: "-ENOENT", ENOMEM: "-ENOMEM", EBUSY: "-EBUSY", EINVAL: "-EINVAL"}


def errno_name(ret: int | None) -> str:
    """A return value as the kernel spells it ("nothing" for a void function's)."""
    return "nothing" if ret is None else NAMES.get(ret, str(ret))
