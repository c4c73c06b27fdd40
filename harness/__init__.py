"""pkvm-harness: build, boot and test arm64 protected KVM (pKVM)."""

from pathlib import Path

__version__ = "0.2.0"

# The repository root: kernel_configs/ and rootfs/ live beside the package.
REPO_ROOT = Path(__file__).resolve().parent.parent
