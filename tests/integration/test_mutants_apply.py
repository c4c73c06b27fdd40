"""Every mutant in tests/mutants/ applies to the kernel sources it is written for: the default
and 7.3 (a dry run on scratch copies of the files it touches: nothing is built and the shared
tree is not changed)."""

from __future__ import annotations

import pytest

from harness.kernel import source
from tests.mutants.mutants import catalogue


@pytest.mark.parametrize("kernel,mutant", [(k, m) for k in ("6.12", "7.3") for m in catalogue(k)],
                         ids=lambda x: x if isinstance(x, str) else x.name)
def test_the_mutant_applies_to_its_kernel_source(cache_dir, kernel, mutant):
    base = source.resolve(None, cache_dir, quiet=True, kernel=kernel)
    patched = source.with_patches(base, [mutant.path], cache_dir, quiet=True)
    assert patched.identity != base.identity and patched.userspace_identity == base.identity
