"""Why an injected allocation failure ends as it does on a stock kernel, where the kernel's code
explains it (pure). A fault sweep (harness.sweep) reports every run; a run whose failed call one
of these explains is a known property of that kernel, not a new finding. Each entry names the
functions the failed call ran under (its caller chain): a kernel without those functions never
meets it, so no version bounds are kept here. The reproducer is the row's site and N.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Explanation:
    under: str                  # a function in the failed call's caller chain
    site: str
    ends: str                   # the verdict it explains (harness.sweep): another one is a finding
    why: str
    says: str = ""              # a regex every one of the run's details must match (the panic line,
                                # the leftovers it explains): anything more is a finding

    def applies(self, site: str, chain: Sequence[str], verdict: str, details: Sequence[str]) -> bool:
        return site == self.site and self.under in chain and verdict == self.ends \
            and all(re.search(self.says, d) for d in details)


_DRAIN = ("not reachable: NULL is how {fn} ends its drain of a torn-down VM's pool, so a real pool is empty "
          "when it comes; failed earlier, the drain stops and the rest of the pool is never given back (what "
          "the row shows)")

# What a stopped drain leaves: the pool's pages still the hyp's, and the hyp stage-1 tables mapping them
_DRAIN_LEFT = (r"^page states: \d+ page\(s\) left(\n    0x[0-9a-f]+: host OWNED / hyp NOPAGE -> host NOPAGE / "
               r"hyp OWNED.*|\n    \.\.\. and \d+ more)+$|^hpool: \d+ page\(s\) left(\n    0x[0-9a-f]+: a hyp "
               r"stage-1 table page \(level \d\))+$")

EXPLAINED = (
    Explanation("reclaim_guest_pages", "hyp_alloc_pages", "leaked", _DRAIN.format(fn="reclaim_guest_pages"),
                says=_DRAIN_LEFT),
    Explanation("reclaim_pgtable_pages", "hyp_alloc_pages", "leaked", _DRAIN.format(fn="reclaim_pgtable_pages"),
                says=_DRAIN_LEFT),
    Explanation("guest_s2_zalloc_pages_exact", "hyp_alloc_pages", "panicked",
                "a latent missing NULL check (guest_s2_zalloc_pages_exact passes the result to "
                "hyp_split_page unchecked): not reachable from the host, since the VM's pool is exactly the "
                "stage-2 PGD EL2 sized and the host donated at __pkvm_init_vm",
                says=r"nVHE hyp panic at: .*hyp_(get|split)_page"),
    Explanation("pkvm_create_mappings_locked", "hyp_alloc_pages", "panicked",
                "by design: hpool is sized at boot for a hyp stage-1 that maps all of memory, so a mapping "
                "the hyp adds for a page it takes or borrows cannot run out; its callers WARN_ON a failure "
                "(do_share and do_donate before 6.14, __pkvm_host_donate_hyp and hyp_pin_shared_mem after), "
                "which panics EL2", says=r"nVHE hyp BUG at: .*mem_protect\.c"),
)


def explain(site: str, chain: Sequence[str], verdict: str, details: Sequence[str]) -> str | None:
    """The kernel's own reason why a failed call at `site` under `chain` ends in `verdict` (with
    `details`: the panic line, the leftovers), if known."""
    bases = [name.split(".")[0] for name in chain]
    return next((e.why for e in EXPLAINED if e.applies(site, bases, verdict, details)), None)
