"""The one assembly of a machine under test: options -> kernel -> payloads -> initramfs -> QEMU
spec -> target. The CLI, the pytest plugin, the bisect runner, bench/ and the integration tests all
build their machines here.

  request = MachineRequest.check(kopts, bopts, cache_dir)   # bad input fails here, nothing written
  machine = assemble(request, run_dir)                      # builds or reuses; writes qemu-cmd.sh
  with machine.start(run_dir) as target: ...                # booted QemuTarget
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path

from harness import rundir
from harness.errors import HarnessError, UsageError
from harness.image.initramfs import READY_MARKER, Initramfs, build_initramfs
from harness.image.payloads import Payloads, build_payloads
from harness.kernel import config as kconfig
from harness.kernel import overlays, prebuilt
from harness.kernel import source as ksource
from harness.kernel.build import BuildRequest, KernelArtifacts, build
from harness.options import BootOptions, KernelOptions, mib
from harness.targets.qemu import QemuSpec, find_qemu, socket_path
from harness.targets.qemu_target import GuestLogin, QemuTarget


def build_request(opts: KernelOptions, cache_dir: Path, quiet: bool = False) -> BuildRequest:
    """Validate the kernel inputs (no build yet): source, fragments, compiler. With --kernel-build,
    the source is the build directory's (its guest payloads and KVM selftests are built from it)."""
    kconfig.merge(opts.fragments, opts.kconfig)       # bad fragments are refused before any unpacking
    src = opts.kernel_src
    if opts.kernel_build is not None and src is None:
        src = prebuilt.source_of(opts.kernel_build)
    pristine = ksource.resolve(src, cache_dir, quiet=quiet, kernel=opts.kernel)
    requested = kconfig.merge(opts.fragments, opts.kconfig, version=pristine.version, el2_debug=opts.el2_debug == "on")
    # harness-only code (the hostile host) comes with the symbol that enables it, as a patch
    added = overlays.patches_for(requested, pristine.tree, cache_dir, pristine.kernel_version)
    source = ksource.with_patches(pristine, [Path(p) for p in opts.patches] + added, cache_dir, quiet=quiet)
    return BuildRequest(source=source, requested=requested, cache_dir=cache_dir,
                        cross_compile=opts.cross_compile, timeout=opts.build_timeout, quiet=quiet,
                        **({"jobs": opts.jobs} if opts.jobs else {}))


@dataclass(frozen=True)
class MachineRequest:
    """Checked inputs: the kernel source and config are valid and QEMU exists; nothing built yet."""

    build: BuildRequest
    boot: BootOptions
    cache_dir: Path
    prebuilt: Path | None = None       # --kernel-build: the developer's own build, used as it is

    @classmethod
    def check(cls, kopts: KernelOptions, bopts: BootOptions, cache_dir: Path, quiet: bool = False,
              qemu: bool = True) -> MachineRequest:
        if kopts.kernel_build is not None and (kopts.patches or kopts.fragments or kopts.kconfig
                                               or kopts.el2_debug != "on"):
            raise UsageError("--kernel-build uses your kernel as it is: --patch, --config, --kconfig and "
                             "--el2-debug do not apply",
                             hint="build the change into your kernel, or drop --kernel-build to let the harness build")
        if kopts.kernel_build is not None:
            prebuilt.check_files(kopts.kernel_build)
        req = build_request(kopts, cache_dir, quiet=quiet)
        if kopts.kernel_build is not None:
            prebuilt.check_config(kopts.kernel_build, req.source.version)
        if qemu:
            find_qemu(bopts.qemu)
        return cls(req, bopts, cache_dir, kopts.kernel_build)

    def kernel(self) -> KernelArtifacts:
        """The kernel: the developer's own build, or built (or reused) in the cache."""
        if self.prebuilt is not None:
            return prebuilt.use(self.prebuilt, self.cache_dir, self.build.source.version)
        return build(self.build)


@dataclass(frozen=True)
class Machine:
    """An assembled, not yet booted, QEMU pKVM host."""

    kernel: KernelArtifacts
    initramfs: Initramfs
    payloads: Payloads | None
    spec: QemuSpec
    boot: BootOptions
    cache_dir: Path

    def start(self, run_dir: Path, transport: str = "console") -> QemuTarget:
        """Boot it (BootFailed or QemuStartError if it does not come up)."""
        login = None
        if transport == "ssh":
            from harness.image.keys import ensure_keys  # cryptography: only the ssh transport needs it

            keys = ensure_keys(self.cache_dir)
            login = GuestLogin(keys.client_private, keys.host_public_line)
        return QemuTarget(self.spec, run_dir, transport=transport, login=login, boot_timeout=self.boot.boot_timeout,
                          vmlinux=self.kernel.vmlinux, expect_mode=self.boot.expect_mode)


def qemu_spec(b: BootOptions, kernel: KernelArtifacts, initramfs: Initramfs, run_dir: Path, *,
              gdb: bool = False) -> QemuSpec:
    return QemuSpec(kernel=kernel.image, initrd=initramfs.path, qmp_socket=socket_path(run_dir, "qmp.sock"),
                    ready_marker=READY_MARKER, cpu=b.cpu, smp=b.smp, mem=b.mem, append=" ".join(b.append),
                    ram_regions=tuple(mib(r) for r in b.ram_regions.split(",")) if b.ram_regions else (),
                    qemu=b.qemu, extra_args=tuple(b.qemu_args),
                    gdb_socket=socket_path(run_dir, "gdb.sock") if gdb else None)


def el2_plugin(request: MachineRequest, kernel: KernelArtifacts, run_dir: Path) -> tuple[Path, Path, Path] | None:
    """el2trace for this machine (library, spec, stream file), or None when --el2-plugin is off, or
    auto and this QEMU cannot run it."""
    from harness.el2 import symbols
    from harness.el2.tcg import build as plugin_build
    from harness.el2.tcg import probes

    if request.boot.el2_plugin == "off":
        return None
    qemu = plugin_build.qemu_info(request.boot.qemu)
    if request.boot.el2_plugin == "auto" and not qemu.has_plugins:
        return None
    try:
        lib = plugin_build.plugin_path(qemu, request.cache_dir, quiet=request.build.quiet)
    except HarnessError as e:
        if request.boot.el2_plugin == "on":
            raise
        # auto: a plugin that cannot be built (no header reachable) leaves the run untraced, said once
        print(f"pkvm-harness: running without el2trace: {e.one_line()}", file=sys.stderr)
        return None
    spec = probes.make_spec(symbols.load(kernel.vmlinux, request.cache_dir), kernel.vmlinux)
    spec_file, stream = probes.write(spec, run_dir)
    return lib, spec_file, stream


def assemble(request: MachineRequest, run_dir: Path, *, payloads: bool = True, gdb: bool = False,
             console_pty: bool = False) -> Machine:
    """Build (or reuse) the kernel, the guest payloads and the initramfs; the QEMU spec (with a
    gdbstub socket when `gdb`: it costs nothing until a tracer connects), its command written to
    the run directory."""
    kernel = request.kernel()
    guest = build_payloads(request.build, kernel) if payloads else None
    initramfs = build_initramfs(request.cache_dir, guest)
    spec = qemu_spec(request.boot, kernel, initramfs, run_dir, gdb=gdb)
    if (plugin := el2_plugin(request, kernel, run_dir)) is not None:
        spec = dc_replace(spec, plugin=plugin)
    if console_pty:
        spec = dc_replace(spec, console_pty=True)       # a person's terminal needs a pty
    rundir.write_qemu_command(run_dir, spec.shell_line())
    return Machine(kernel, initramfs, guest, spec, request.boot, request.cache_dir)
