import os
import subprocess

import pytest

from harness.fsutil import atomic_dir
from harness.kernel import source
from harness.kernel.build import cache_key


def test_cache_key_depends_on_every_input():
    base = cache_key("git:abc", "CONFIG_A=y\n", "gcc 12")
    assert base == cache_key("git:abc", "CONFIG_A=y\n", "gcc 12")
    assert len({base, cache_key("git:abd", "CONFIG_A=y\n", "gcc 12"),
                cache_key("git:abc", "CONFIG_A=n\n", "gcc 12"),
                cache_key("git:abc", "CONFIG_A=y\n", "gcc 13")}) == 4


def _linux_tree(path):
    (path / "arch/arm64/kvm/hyp/nvhe").mkdir(parents=True)
    (path / "arch/arm64/kvm/hyp/nvhe/page_alloc.c").write_text("// buddy\n")
    (path / "Kconfig").write_text("mainmenu \"Linux\"\n")
    (path / "Makefile").write_text("# SPDX\nVERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = 117\nEXTRAVERSION =\n")
    return path


def _git(tree, *args):
    subprocess.run(["git", "-C", str(tree), *args], check=True, capture_output=True)


def test_git_identity_tracks_commit_diff_and_untracked_files(tmp_path):
    tree = _linux_tree(tmp_path)
    _git(tree, "init", "-q")
    _git(tree, "add", "-A")
    _git(tree, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    clean = source.resolve(tree, tmp_path / "cache")
    assert clean.identity.startswith("git:") and "+dirty" not in clean.identity
    assert clean.version == "6.12.117" and clean.kernel_version.tuple == (6, 12, 117)
    index_before = (tree / ".git/index").read_bytes()

    (tree / "arch/arm64/kvm/hyp/nvhe/page_alloc.c").write_text("// buddy, patched\n")
    dirty = source.resolve(tree, tmp_path / "cache").identity
    assert dirty.startswith(clean.identity + "+dirty:")
    (tree / "new.c").write_text("int x;\n")
    with_untracked = source.resolve(tree, tmp_path / "cache").identity
    assert with_untracked not in (dirty, clean.identity)
    assert source.resolve(tree, tmp_path / "cache").identity == with_untracked   # stable
    assert (tree / ".git/index").read_bytes() == index_before                  # never written


def test_commits_that_change_only_the_kernel_share_the_userspace_identity(tmp_path):
    """Bisect steps that touch only kernel code reuse one payload build; a tools/ change does not."""
    tree = _linux_tree(tmp_path)
    (tree / "tools").mkdir()
    (tree / "tools/t.c").write_text("int main(void) { return 0; }\n")
    _git(tree, "init", "-q")

    def commit(msg):
        _git(tree, "add", "-A")
        _git(tree, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", msg)
        return source.resolve(tree, tmp_path / "cache")

    first = commit("base")
    (tree / "arch/arm64/kvm/hyp/nvhe/page_alloc.c").write_text("// buddy, changed\n")
    kernel_only = commit("kernel")
    (tree / "tools/t.c").write_text("int main(void) { return 1; }\n")
    tools = commit("tools")
    assert first.identity != kernel_only.identity
    assert first.userspace_identity == kernel_only.userspace_identity != tools.userspace_identity


def test_plain_tree_identity_changes_with_content(tmp_path):
    tree = _linux_tree(tmp_path)
    first = source.resolve(tree, tmp_path / "cache").identity
    assert first.startswith("tree:")
    (tree / "arch/arm64/kvm/hyp/nvhe/page_alloc.c").write_text("// changed size\n")
    assert source.resolve(tree, tmp_path / "cache").identity != first


def test_tarball_identity_is_its_hash_and_is_remembered(tmp_path):
    tree = _linux_tree(tmp_path / "linux-x")
    tarball = tmp_path / "linux-x.tar.xz"
    subprocess.run(["tar", "-cJf", str(tarball), "-C", str(tmp_path), "linux-x"], check=True)
    cache = tmp_path / "cache"
    src = source.resolve(tarball, cache)
    assert src.identity.startswith("tarball:") and src.version == "6.12.117"
    assert src.tree.name == "linux-x" and src.tree.is_relative_to(cache / "src")
    assert (cache / "src" / "tarball-ids.json").is_file()
    assert source.resolve(tarball, cache) == src
    del tree


@pytest.mark.parametrize("make", ["", "not a makefile\n"])
def test_non_linux_tree_is_refused(tmp_path, make):
    (tmp_path / "Makefile").write_text(make)
    with pytest.raises(source.UsageError) as e:
        source.resolve(tmp_path, tmp_path / "cache")
    assert "not a Linux kernel tree" in e.value.message


def test_missing_path_and_unclean_tree_are_refused(tmp_path):
    with pytest.raises(source.UsageError, match="does not exist"):
        source.resolve(tmp_path / "nope", tmp_path / "cache")
    tree = _linux_tree(tmp_path / "t")
    (tree / ".config").write_text("CONFIG_X=y\n")
    with pytest.raises(source.UsageError) as e:
        source.resolve(tree, tmp_path / "cache")
    assert "mrproper" in e.value.hint


def test_tree_without_pkvm_is_refused(tmp_path):
    tree = _linux_tree(tmp_path)
    (tree / "arch/arm64/kvm/hyp/nvhe/page_alloc.c").unlink()
    with pytest.raises(source.UsageError, match="cannot run pKVM"):
        source.resolve(tree, tmp_path / "cache")


def test_atomic_dir_leaves_nothing_behind_on_failure(tmp_path):
    final = tmp_path / "kernels" / "key"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "Image").write_bytes(b"half")
            raise RuntimeError("interrupted build")
    assert not final.exists()
    assert list((tmp_path / "kernels").iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "Image").write_bytes(b"whole")
    assert (final / "Image").read_bytes() == b"whole"


def test_patches_apply_to_one_repatched_copy_and_change_the_identity(tmp_path):
    tree = _linux_tree(tmp_path / "linux")
    target = tree / "arch/arm64/kvm/hyp/nvhe/page_alloc.c"
    patch = tmp_path / "fix.patch"
    patch.write_text("--- a/arch/arm64/kvm/hyp/nvhe/page_alloc.c\n+++ b/arch/arm64/kvm/hyp/nvhe/page_alloc.c\n"
                     "@@ -1 +1 @@\n-// buddy\n+// buddy, patched\n")
    other = tmp_path / "other.patch"
    other.write_text(patch.read_text().replace("patched", "mutated"))
    base = source.resolve(tree, tmp_path / "cache")
    patched = source.with_patches(base, [patch], tmp_path / "cache")
    assert patched.identity.startswith(base.identity + "+patches:") and patched.tree != base.tree
    assert patched.userspace_identity == base.identity            # kernel-only: payloads are shared
    copy = patched.tree / "arch/arm64/kvm/hyp/nvhe/page_alloc.c"
    patched.checkout()
    assert copy.read_text() == "// buddy, patched\n"
    assert target.read_text() == "// buddy\n"                       # the user's tree is untouched
    mutated = source.with_patches(base, [other], tmp_path / "cache")
    assert mutated.tree == patched.tree and mutated.identity != patched.identity   # one tree, one O= dir
    mutated.checkout()
    assert copy.read_text() == "// buddy, mutated\n" and target.read_text() == "// buddy\n"
    patched.checkout()
    assert copy.read_text() == "// buddy, patched\n"
    bad = tmp_path / "bad.patch"
    bad.write_text(patch.read_text().replace("-// buddy\n", "-// something else\n"))
    with pytest.raises(source.UsageError, match="does not apply"):
        source.with_patches(base, [bad], tmp_path / "cache")          # refused before any build
    assert copy.read_text() == "// buddy, patched\n"                 # and the shared tree is as it was
    entries = list((tmp_path / "cache" / "src").iterdir())
    assert not any(p.name.endswith(".tmp") for p in entries)           # nothing half-written
    assert [p.name for p in entries if p.name.startswith("patched-")] == [patched.tree.parent.name]


def test_restored_files_get_a_new_mtime_so_kbuild_rebuilds_them(tmp_path):
    tree = _linux_tree(tmp_path / "linux")
    patch = tmp_path / "fix.patch"
    patch.write_text("--- a/arch/arm64/kvm/hyp/nvhe/page_alloc.c\n+++ b/arch/arm64/kvm/hyp/nvhe/page_alloc.c\n"
                     "@@ -1 +1 @@\n-// buddy\n+// buddy, patched\n")
    base = source.resolve(tree, tmp_path / "cache")
    patched = source.with_patches(base, [patch], tmp_path / "cache")
    patched.checkout()
    copy = patched.tree / "arch/arm64/kvm/hyp/nvhe/page_alloc.c"
    os.utime(copy, (1, 1))
    empty = tmp_path / "empty.patch"
    empty.write_text("--- a/arch/arm64/kvm/hyp/nvhe/page_alloc.c\n+++ b/arch/arm64/kvm/hyp/nvhe/page_alloc.c\n"
                     "@@ -1 +1 @@\n-// buddy\n+// buddy\n")
    source.with_patches(base, [empty], tmp_path / "cache").checkout()
    assert copy.read_text() == "// buddy\n" and copy.stat().st_mtime > 1
