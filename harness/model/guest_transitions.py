"""The host/guest page-state transitions of 6.14+, as harness.model.transitions judges them (pure).

mem_protect.c, 7.3: the host shares pages with a guest (`__pkvm_host_share_guest`: host OWNED, or
SHARED_OWNED and already shared with guests only, becomes SHARED_OWNED with one more guest share)
and takes them back (`__pkvm_host_unshare_guest`: one share fewer, OWNED at none), donates a page
to a protected guest (`__pkvm_host_donate_guest`: host OWNED -> NOPAGE), and reclaims it when the
VM dies (`__pkvm_host_reclaim_page_guest`, `__pkvm_host_force_reclaim_page_guest`: back to host
OWNED); a guest shares a page it owns with the host and stops (`__pkvm_guest_share_host`,
`__pkvm_guest_unshare_host`: host NOPAGE <-> SHARED_BORROWED). The hyp's state never changes.

Unshare and reclaim name a guest frame, not a page: `GuestMap` keeps, from power-on, which page
each (VM, gfn) holds, from the calls that put it there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.model.errnos import ENOENT, EPERM
from harness.model.stage2 import State

PAGE = 4096
SHARE, UNSHARE, DONATE = "__pkvm_host_share_guest", "__pkvm_host_unshare_guest", "__pkvm_host_donate_guest"
RECLAIM, FORCE_RECLAIM = "__pkvm_host_reclaim_page_guest", "__pkvm_host_force_reclaim_page_guest"
GUEST_SHARE, GUEST_UNSHARE = "__pkvm_guest_share_host", "__pkvm_guest_unshare_host"
GUEST_FUNCTIONS = (SHARE, UNSHARE, DONATE, RECLAIM, FORCE_RECLAIM, GUEST_SHARE, GUEST_UNSHARE)
# What a guest frame holds: a page the host shares with it, one it owns, one it owns and shares back.
SHARED, DONATED, SHARED_BACK = "shared by the host", "donated", "shared back with the host"


@dataclass
class GuestMap:
    """(VM, gfn) -> (page, what the guest holds it as), kept from every successful call."""

    frames: dict[tuple[int, int], tuple[int, str]] = field(default_factory=dict)

    def pages_of(self, vm: int, gfn: int, nr_pages: int) -> list[tuple[int, str] | None]:
        return [self.frames.get((vm, gfn + i)) for i in range(nr_pages)]

    def frame_of(self, pa: int) -> tuple[int, int] | None:
        return next((key for key, (page, kind) in self.frames.items() if page == pa and kind != SHARED), None)


@dataclass(frozen=True)
class Outcome:
    """What the model makes of one guest call: the return it predicts (None: it cannot tell, any
    refusal is taken), why, the pages it names, and what a success changes."""

    want: int | None
    why: str
    pages: list[int]
    host: dict[int, State]                    # page -> the host's state after a success
    counts: dict[int, int]                    # page -> its guest share count after a success
    frames: dict[tuple[int, int], tuple[int, str] | None]   # (vm, gfn) -> after a success (None: gone)


def judge(t: Any, view: Any, count: Any, guests: GuestMap) -> Outcome:
    """The model's outcome of guest call `t` (a Transition) given each page's (host, hyp) `view`
    and guest share `count` now."""
    if t.name == SHARE:
        pages = t.pages()
        bad = [pa for pa in pages if not _shareable(view(pa), count(pa))]
        mapped = [i for i, f in enumerate(guests.pages_of(t.vm, t.gfn, t.nr_pages)) if f is not None]
        why = (f"page {bad[0]:#x} is host {view(bad[0])[0].value} with {count(bad[0])} guest share(s)" if bad else
               f"gfn {t.gfn + mapped[0]:#x} is mapped already" if mapped else "")
        return Outcome(EPERM if why else 0, why, pages, {pa: State.SHARED_OWNED for pa in pages},
                       {pa: count(pa) + 1 for pa in pages},
                       {(t.vm, t.gfn + i): (pa, SHARED) for i, pa in enumerate(pages)})
    if t.name == UNSHARE:
        frames = guests.pages_of(t.vm, t.gfn, t.nr_pages)
        if any(f is None for f in frames):
            return Outcome(ENOENT, f"gfn {t.gfn:#x}+{t.nr_pages} is not mapped", [], {}, {}, {})
        pages = [f[0] for f in frames if f is not None]
        if any(f[1] != SHARED for f in frames if f is not None):
            return Outcome(EPERM, "the guest owns that frame: the host did not share it", pages, {}, {}, {})
        after = {pa: count(pa) - 1 for pa in pages}
        return Outcome(0, "", pages, {pa: State.OWNED if after[pa] == 0 else State.SHARED_OWNED for pa in pages},
                       after, {(t.vm, t.gfn + i): None for i in range(t.nr_pages)})
    if t.name == DONATE:
        pa = t.pa
        host, _ = view(pa)
        why = (f"page {pa:#x} is host {host.value}" if host != State.OWNED or count(pa) else
               f"gfn {t.gfn:#x} is mapped already" if guests.pages_of(t.vm, t.gfn, 1)[0] else "")
        return Outcome(EPERM if why else 0, why, [pa], {pa: State.NOPAGE}, {}, {(t.vm, t.gfn): (pa, DONATED)})
    if t.name in (GUEST_SHARE, GUEST_UNSHARE):
        frame = guests.pages_of(t.vm, t.gfn, 1)[0]
        need, to, host = (DONATED, SHARED_BACK, State.SHARED_BORROWED) if t.name == GUEST_SHARE else \
            (SHARED_BACK, DONATED, State.NOPAGE)
        if frame is None:                   # not faulted in yet (-ENOENT), or poisoned (-EHWPOISON)
            return Outcome(None, "not mapped", [], {}, {}, {})
        if frame[1] != need:
            return Outcome(EPERM, f"gfn {t.gfn:#x} is {frame[1]}, not {need}", [frame[0]], {}, {}, {})
        return Outcome(0, "", [frame[0]], {frame[0]: host}, {}, {(t.vm, t.gfn): (frame[0], to)})
    # reclaim of a dying VM's page, by frame or (forced) by page: what the guest owned comes back
    key = (t.vm, t.gfn) if t.name == RECLAIM else guests.frame_of(t.pa)
    frame = guests.frames.get(key) if key is not None else None
    if key is None or frame is None:        # never mapped, or reclaimed (poisoned) already: no change
        return Outcome(None, "not mapped", [], {}, {}, {})
    if frame[1] == SHARED:
        return Outcome(EPERM, "the host shared that page: it is unshared, not reclaimed", [frame[0]], {}, {}, {})
    if t.name == FORCE_RECLAIM and frame[1] != DONATED:
        return Outcome(EPERM, "a forced reclaim takes only a page the guest owns alone", [frame[0]], {}, {}, {})
    return Outcome(0, "", [frame[0]], {frame[0]: State.OWNED}, {}, {key: None})


def _shareable(view: tuple[State, State], count: int) -> bool:
    host, hyp = view
    return hyp == State.NOPAGE and (host == State.OWNED and not count or host == State.SHARED_OWNED and count > 0)
