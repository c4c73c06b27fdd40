"""Why an injected allocation failure ends as it does on a stock kernel, where the kernel's code
explains it (pure). A fault sweep (harness.sweep) reports every run; a run whose failed call one
of these explains is a known property of that kernel, not a new finding. Each entry names the
functions the failed call ran under (its caller chain) and the versions it holds for; the
reproducer is the row's site and N.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from harness.kernel.version import KernelVersion


@dataclass(frozen=True)
class Explanation:
    under: str                  # a function in the failed call's caller chain
    site: str
    why: str
    since: str = "6.1"
    until: str | None = None    # the first version it no longer holds for

    def applies(self, site: str, chain: Sequence[str], version: KernelVersion) -> bool:
        if site != self.site or self.under not in chain or version < KernelVersion.parse(self.since):
            return False
        return self.until is None or version < KernelVersion.parse(self.until)


EXPLAINED = (
    Explanation("reclaim_guest_pages", "hyp_alloc_pages",
                "not reachable: NULL is how reclaim_guest_pages' drain of a torn-down VM's pool ends, so a "
                "real pool is empty when it comes; failed earlier, the drain stops and the rest of the pool "
                "is never given back (what the row shows)"),
    Explanation("guest_s2_zalloc_pages_exact", "hyp_alloc_pages",
                "a latent missing NULL check (guest_s2_zalloc_pages_exact passes the result to "
                "hyp_split_page unchecked): not reachable from the host, since the VM's pool is exactly the "
                "stage-2 PGD EL2 sized and the host donated at __pkvm_init_vm", since="6.2"),
    Explanation("do_share", "hyp_alloc_pages",
                "by design: hpool is sized at boot for a hyp stage-1 that maps all of memory, so the mapping "
                "a share adds cannot run out; if it did, do_share's WARN_ON(__do_share()) panics EL2",
                until="6.14"),
    Explanation("do_donate", "hyp_alloc_pages",
                "by design: hpool is sized at boot for a hyp stage-1 that maps all of memory, so the mapping "
                "a donation adds cannot run out; if it did, do_donate's WARN_ON(__do_donate()) panics EL2",
                until="6.14"),
)


def explain(site: str, chain: Sequence[str], version: KernelVersion) -> str | None:
    """The kernel's own reason for how a failed call at `site` under `chain` ends, if known."""
    bases = [name.split(".")[0] for name in chain]
    return next((e.why for e in EXPLAINED if e.applies(site, bases, version)), None)
