"""Config mistakes against the real 6.12 tree: refused before anything is built or cached."""

from __future__ import annotations

from tests.integration.conftest import run_cli


def _cache_listing(cache_dir):
    return sorted(p.name for sub in ("kernels", "build") if (cache_dir / sub).is_dir()
                  for p in (cache_dir / sub).iterdir())


def test_misspelled_option_is_refused_before_building(cache_dir, tmp_path):
    frag = tmp_path / "typo.config"
    frag.write_text("CONFIG_KVM=y\nCONFIG_NVHE_EL2_DEBGU=y\n")
    before = _cache_listing(cache_dir)
    r = run_cli("build", "--config", str(frag), "-q")
    assert r.returncode == 2, r.stdout + r.stderr
    line, = r.stderr.strip().splitlines()
    assert "typo.config:2: CONFIG_NVHE_EL2_DEBGU is not a Kconfig symbol" in line
    assert "did you mean CONFIG_NVHE_EL2_DEBUG?" in line
    assert _cache_listing(cache_dir) == before


def test_el2_debug_without_jump_label_is_refused(cache_dir):
    before = _cache_listing(cache_dir)
    r = run_cli("build", "--kconfig", "CONFIG_JUMP_LABEL=n", "-q")
    assert r.returncode == 2, r.stdout + r.stderr
    line, = r.stderr.strip().splitlines()
    assert "CONFIG_NVHE_EL2_DEBUG=y without CONFIG_JUMP_LABEL=y" in line and "--kconfig CONFIG_JUMP_LABEL=y" in line
    assert _cache_listing(cache_dir) == before
