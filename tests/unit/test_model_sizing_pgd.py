"""A VM's stage-2 PGD size (harness.model.sizing.stage2_pgd_pages), worked by hand from
kvm_pgtable_stage2_pgd_size() for a 4 KiB granule."""

import pytest

from harness.model.sizing import stage2_pgd_pages


@pytest.mark.parametrize("ipa_bits, pages", [
    (32, 4),    # 2 levels from level 2 (shift 21): 2^11 entries, 4 concatenated tables
    (36, 1),    # 3 levels from level 1 (shift 30): 64 entries
    (40, 2),    # the default IPA size: 1024 level-1 entries, 2 tables
    (42, 8),    # 4096 level-1 entries: 8 tables
    (44, 1),    # 4 levels from level 0 (shift 39): 32 entries
    (48, 1),    # 512 level-0 entries
])
def test_the_pgd_is_the_start_levels_entries_in_concatenated_tables(ipa_bits, pages):
    assert stage2_pgd_pages(ipa_bits) == pages
