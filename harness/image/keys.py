"""SSH keys for the QEMU target, made once per cache and reused so images stay byte-identical.

  keys/harness_ed25519        the harness's client key (OpenSSH format), installed in the guest
                              as /root/.ssh/authorized_keys
  keys/dropbear_ed25519_host  the guest's host key, made with the host's `dropbearkey` at image
                              build time; its public half is pinned, so even QEMU gets strict
                              host-key checking
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness.errors import UsageError
from harness.fsutil import atomic_write_bytes, file_lock


@dataclass(frozen=True)
class GuestKeys:
    client_private: Path
    client_public_line: str      # "ssh-ed25519 AAAA... pkvm-harness"
    host_private: Path           # dropbear format, goes into the image
    host_public_line: str        # "ssh-ed25519 AAAA..."


def ensure_keys(cache_dir: Path) -> GuestKeys:
    keys = cache_dir / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    client = keys / "harness_ed25519"
    host = keys / "dropbear_ed25519_host"
    with file_lock(keys / ".lock"):
        if not client.is_file():
            k = Ed25519PrivateKey.generate()
            pub = k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            atomic_write_bytes(client.with_suffix(".pub"), pub + b" pkvm-harness\n")
            atomic_write_bytes(client, k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                       serialization.NoEncryption()))
            client.chmod(0o600)
        if not host.is_file():
            if shutil.which("dropbearkey") is None:
                raise UsageError("dropbearkey not found (it makes the guest's SSH host key)",
                                 hint="run `make setup` (installs dropbear-bin)")
            tmp = host.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            subprocess.run(["dropbearkey", "-t", "ed25519", "-f", str(tmp)], check=True, capture_output=True)
            out = subprocess.run(["dropbearkey", "-y", "-f", str(tmp)], check=True, capture_output=True,
                                 text=True).stdout
            host_pub = next(line for line in out.splitlines() if line.startswith("ssh-"))
            atomic_write_bytes(host.with_suffix(".pub"), (" ".join(host_pub.split()[:2]) + "\n").encode())
            tmp.rename(host)
    return GuestKeys(client, client.with_suffix(".pub").read_text().strip(), host,
                     host.with_suffix(".pub").read_text().strip())
