import pytest

from harness.errors import ConfigError, ExitCode, UsageError
from harness.kernel import config as kc


def test_parse_fragment_values_and_comments():
    opts = kc.parse_fragment('# comment\n\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=4\n'
                             'CONFIG_S="a b"\nCONFIG_H=0x10\n', "f.config")
    assert [(o.name, o.value, o.origin) for o in opts] == [
        ("A", "y", "f.config:3"), ("B", "n", "f.config:4"), ("N", "4", "f.config:5"),
        ("S", '"a b"', "f.config:6"), ("H", "0x10", "f.config:7")]


@pytest.mark.parametrize("line", ["CONFIG_A", "CONFIG_A=", "CONFIG_A=yes", "FOO=y", "CONFIG_A=two words"])
def test_parse_rejects_malformed_lines_with_location(line):
    with pytest.raises(ConfigError) as e:
        kc.parse_fragment(f"CONFIG_OK=y\n{line}\n", "bad.config")
    assert "bad.config:2" in e.value.message
    assert e.value.exit_code == ExitCode.USAGE


def test_merge_default_then_fragments_then_kconfig(tmp_path):
    extra = tmp_path / "extra.config"
    extra.write_text("CONFIG_KVM=n\nCONFIG_NEW=y\n")
    merged = kc.merge([str(extra)], ["CONFIG_NEW=n", "DEVMEM=y"])
    assert merged["KVM"].value == "n" and merged["KVM"].origin == "extra.config:1"
    assert merged["NEW"].value == "n" and merged["NEW"].origin == "--kconfig"
    assert merged["DEVMEM"].value == "y"
    # overrides move to the end, so the merged text reads in the order things were applied
    assert list(merged)[-2:] == ["NEW", "DEVMEM"]
    assert merged["JUMP_LABEL"].origin.startswith("pkvm.config:")


def test_unknown_fragment_names_known_ones():
    with pytest.raises(UsageError) as e:
        kc.merge(["no-such-fragment"], [])
    assert "pkvm.config" in e.value.hint


def test_fragment_by_short_name(tmp_path, monkeypatch):
    (tmp_path / "extra.config").write_text("CONFIG_X=y\n")
    monkeypatch.setattr(kc, "FRAGMENTS_DIR", tmp_path)
    monkeypatch.setattr(kc, "DEFAULT_FRAGMENTS", ())
    assert list(kc.merge(["extra"], [])) == ["X"]


def test_apply_fragment_replaces_old_lines():
    dot = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\n"
    req = {o.name: o for o in kc.parse_fragment("CONFIG_B=y\n# CONFIG_A is not set\n", "f")}
    out = kc.apply_fragment(dot, req)
    assert kc.parse_dotconfig(out) == {"A": "n", "B": "y", "C": "y"}
    assert out.count("CONFIG_A") == 1 and out.count("CONFIG_B") == 1


def _tree(tmp_path):
    (tmp_path / "arch/arm64/kvm").mkdir(parents=True)
    (tmp_path / "arch/arm64/kvm/Kconfig").write_text(
        "menuconfig KVM\n\tbool \"KVM\"\n\tdepends on HAVE_KVM\n\tdepends on OF\n\n"
        "config NVHE_EL2_DEBUG\n\tbool \"debug\"\n\tdepends on KVM\n")
    (tmp_path / "Kconfig").write_text("config JUMP_LABEL\n\tbool \"jl\"\nsource \"arch/Kconfig\"\n")
    return kc.kconfig_symbols(tmp_path)


def test_kconfig_symbols_and_dependencies(tmp_path):
    syms = _tree(tmp_path)
    assert set(syms) == {"KVM", "NVHE_EL2_DEBUG", "JUMP_LABEL"}
    assert syms["KVM"].depends == ["HAVE_KVM", "OF"]
    assert syms["KVM"].where == "arch/arm64/kvm/Kconfig:1"
    assert syms["JUMP_LABEL"].depends == []


def test_misspelled_option_is_refused_with_a_suggestion(tmp_path):
    syms = _tree(tmp_path)
    req = {o.name: o for o in kc.parse_fragment("CONFIG_NVHE_EL2_DEBGU=y\n", "my.config")}
    with pytest.raises(ConfigError) as e:
        kc.check_known(req, syms)
    assert "my.config:1" in e.value.message and "CONFIG_NVHE_EL2_DEBGU" in e.value.message
    assert e.value.hint == "did you mean CONFIG_NVHE_EL2_DEBUG?"


def test_lost_option_names_its_dependencies(tmp_path):
    syms = _tree(tmp_path)
    req = {o.name: o for o in kc.parse_fragment("CONFIG_KVM=y\nCONFIG_JUMP_LABEL=y\n", "f.config")}
    with pytest.raises(ConfigError) as e:
        kc.check_survived(req, {"JUMP_LABEL": "y"}, syms)
    assert "CONFIG_KVM=y from f.config:1 became n (depends on HAVE_KVM && OF)" in e.value.message
    assert "JUMP_LABEL" not in e.value.message
    kc.check_survived(req, {"KVM": "y", "JUMP_LABEL": "y"}, syms)  # all survived: no error


def test_el2_debug_without_jump_label_is_refused_with_the_fix():
    with pytest.raises(ConfigError) as e:
        kc.check_combinations({"NVHE_EL2_DEBUG": "y", "JUMP_LABEL": "n"})
    assert "CONFIG_JUMP_LABEL=y" in e.value.hint
    assert "pkvm_alloc_private_va_range" in e.value.message
    kc.check_combinations({"NVHE_EL2_DEBUG": "y", "JUMP_LABEL": "y"})
    kc.check_combinations({"NVHE_EL2_DEBUG": "n"})
    # Before olddefconfig only what was named is judged: JUMP_LABEL may still come from elsewhere.
    kc.check_combinations({"NVHE_EL2_DEBUG": "y"}, explicit_only=True)
    with pytest.raises(ConfigError):
        kc.check_combinations({"NVHE_EL2_DEBUG": "y", "JUMP_LABEL": "n"}, explicit_only=True)
    with pytest.raises(ConfigError):
        kc.check_combinations({"NVHE_EL2_DEBUG": "y"})


def test_default_fragment_is_self_consistent():
    merged = kc.merge([], [])
    values = {o.name: o.value for o in merged.values()}
    kc.check_combinations(values)
    assert values["KVM"] == "y" and values["DEBUG_INFO_DWARF4"] == "y"


def test_the_el2_stack_trace_option_is_spelt_as_each_version_does():
    from harness.kernel.config import merge, version_fragments

    assert version_fragments("6.12.117") == ["pkvm-stacktrace-nvhe.config", "pkvm-pan.config"]
    assert version_fragments("7.3.4") == ["pkvm-stacktrace.config", "pkvm-el2-trace.config"]
    assert version_fragments("7.2.13") == ["pkvm-stacktrace.config", "pkvm-el2-trace-7.2.config"]
    assert version_fragments("5.15") == ["pkvm-pan.config"]
    new, old = merge([], [], version="7.3.4"), merge([], [], version="6.1.192")
    assert new["PKVM_STACKTRACE"].value == new["PKVM_DISABLE_STAGE2_ON_PANIC"].value == "y"
    assert "PROTECTED_NVHE_STACKTRACE" not in new and old["PROTECTED_NVHE_STACKTRACE"].value == "y"
    assert "PKVM_STACKTRACE" not in old
    assert "ARM64_PAN" not in new and old["ARM64_PAN"].value == "y"


def test_el2_debug_off_drops_nvhe_el2_debug_and_what_hangs_off_it():
    from harness.kernel.config import merge, version_fragments

    assert version_fragments("7.3.4", el2_debug=False) == []
    assert version_fragments("6.12.117", el2_debug=False) == ["pkvm-pan.config"]
    for version in ("6.12.117", "7.3.4"):
        on, off = merge([], [], version=version), merge([], [], version=version, el2_debug=False)
        assert on["NVHE_EL2_DEBUG"].value == "y" and off["NVHE_EL2_DEBUG"].value == "n"
        assert not {"PKVM_STACKTRACE", "PROTECTED_NVHE_STACKTRACE", "FTRACE", "NVHE_EL2_TRACING"} & set(off)
        kc.check_combinations({o.name: o.value for o in off.values()})
        assert kc.fragment_text(on) != kc.fragment_text(off)          # two cache keys, two kernels
    assert merge([], [], version="7.3.4")["NVHE_EL2_TRACING"].value == "y"
