"""Every mutant in tests/mutants/ applies to the default kernel source (a dry run on scratch
copies of the files it touches: nothing is built and the shared tree is not changed)."""

from __future__ import annotations

import pytest

from harness.kernel import source
from tests.mutants.mutants import catalogue


@pytest.mark.parametrize("mutant", catalogue(), ids=lambda m: m.name)
def test_the_mutant_applies_to_the_default_source(cache_dir, mutant):
    base = source.resolve(None, cache_dir, quiet=True)
    patched = source.with_patches(base, [mutant.path], cache_dir, quiet=True)
    assert patched.identity != base.identity and patched.userspace_identity == base.identity
