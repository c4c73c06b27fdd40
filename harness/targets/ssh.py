"""SSH with paramiko: the QEMU target's ssh transport and the board target (SshTarget).

Host keys are checked strictly: against a pinned key (QEMU: the image's own host key) or a
known_hosts file (boards). An unknown or changed key is refused unless the user explicitly
accepts new keys, which are then saved.
"""

from __future__ import annotations

import contextlib
import select
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import paramiko

from harness.errors import UsageError
from harness.targets.base import CommandResult, CommandTimeout, TargetDead, TargetError, TargetInfo
from harness.targets.shell import ShellHelpers

KEEPALIVE_SECONDS = 15


@dataclass(frozen=True)
class SshParams:
    host: str
    port: int = 22
    user: str = "root"
    key: Path | None = None                  # None: the user's agent/default keys (boards only)
    known_hosts: Path | None = None          # boards: ~/.ssh/known_hosts by default
    pinned_host_key: str | None = None       # "ssh-ed25519 AAAA..." (QEMU)
    accept_new_host_key: bool = False
    connect_timeout: float = 10.0

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


class SshSession:
    def __init__(self, params: SshParams) -> None:
        self.p = params
        self.client: paramiko.SSHClient | None = None

    # --- connection ---------------------------------------------------------------------

    def connect(self) -> None:
        """One attempt within connect_timeout; raises TargetError saying what to do."""
        self.close()
        client = paramiko.SSHClient()
        name = self.p.known_hosts_name()
        if self.p.pinned_host_key:
            keytype, b64 = self.p.pinned_host_key.split()[:2]
            client.get_host_keys().add(name, keytype, paramiko.PKey.from_type_string(keytype, _b64(b64)))
        elif self.p.known_hosts and self.p.known_hosts.is_file():
            client.load_host_keys(str(self.p.known_hosts))
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy() if self.p.accept_new_host_key
                                           else paramiko.RejectPolicy())
        pkey = paramiko.PKey.from_path(str(self.p.key)) if self.p.key else None
        t = self.p.connect_timeout
        try:
            client.connect(self.p.host, self.p.port, self.p.user, pkey=pkey, timeout=t, banner_timeout=t,
                           auth_timeout=t, allow_agent=pkey is None, look_for_keys=pkey is None)
        except paramiko.BadHostKeyException as e:
            client.close()
            if self.p.accept_new_host_key and not self.p.pinned_host_key:
                self._forget_host_key(name)
                return self.connect()
            raise TargetError(f"the host key of {self.p.address} changed ({e.key.get_name()} "
                              f"{e.key.get_fingerprint().hex()}); refusing to connect",
                              hint="if the board was reinstalled, pass --pkvm-ssh-accept-new-host-key "
                                   f"(or remove {name} from {self.p.known_hosts})") from None
        except paramiko.SSHException as e:
            client.close()
            if "not found in known_hosts" in str(e):
                raise TargetError(f"{self.p.address} is not in {self.p.known_hosts or 'known_hosts'}",
                                  hint="check the fingerprint, then pass --pkvm-ssh-accept-new-host-key once") from None
            if isinstance(e, paramiko.AuthenticationException):
                raise TargetError(f"{self.p.address} refused the key {self.p.key or '(default keys)'}",
                                  hint="install its public half in the board's authorized_keys or pass --pkvm-ssh-key")\
                    from None
            raise TargetError(f"SSH to {self.p.address} failed: {e}", hint="check the host and port") from None
        except (TimeoutError, OSError) as e:
            client.close()
            raise TargetError(f"cannot reach {self.p.address}: {e}",
                              hint="check the address, the network and that sshd/dropbear runs") from None
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(KEEPALIVE_SECONDS)
        if self.p.accept_new_host_key and self.p.known_hosts and not self.p.pinned_host_key:
            self.p.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            client.save_host_keys(str(self.p.known_hosts))
        self.client = client

    def connect_until(self, deadline: float) -> None:
        """Retry connecting (a booting machine) until `deadline`; host-key and auth errors are final."""
        while True:
            try:
                return self.connect()
            except TargetError as e:
                final = "host key" in e.message or "refused the key" in e.message or "known_hosts" in e.message
                if final or time.monotonic() + 1 > deadline:
                    raise
                time.sleep(0.5)

    def _forget_host_key(self, name: str) -> None:
        if self.p.known_hosts and self.p.known_hosts.is_file():
            keys = paramiko.HostKeys(str(self.p.known_hosts))
            if name in keys:
                del keys[name]
            keys.save(str(self.p.known_hosts))

    def alive(self) -> bool:
        t = self.client.get_transport() if self.client else None
        return bool(t and t.is_active())

    def close(self) -> None:
        if self.client:
            with contextlib.suppress(Exception):
                self.client.close()
        self.client = None

    # --- commands and files ---------------------------------------------------------------

    def run(self, cmd: str, timeout: float = 60.0) -> CommandResult:
        if not self.alive():
            raise TargetDead(f"the SSH connection to {self.p.address} is closed", command_started=False)
        start = time.monotonic()
        deadline = start + timeout
        assert self.client is not None
        try:
            chan = self.client.get_transport().open_session(  # type: ignore[union-attr]
                timeout=min(timeout, self.p.connect_timeout))
        except (paramiko.SSHException, EOFError, OSError) as e:
            self.close()
            raise TargetDead(f"the SSH connection to {self.p.address} was lost: {e or type(e).__name__}",
                             command_started=False) from None
        out, err = bytearray(), bytearray()
        try:
            chan.exec_command(cmd)
            chan.shutdown_write()   # no stdin: a command waiting for input sees EOF
            while not (chan.exit_status_ready() and chan.eof_received):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Deadline
                select.select([chan], [], [], min(0.5, remaining))
                out += _drain(chan.recv_ready, chan.recv)
                err += _drain(chan.recv_stderr_ready, chan.recv_stderr)
            out += _drain(chan.recv_ready, chan.recv)
            err += _drain(chan.recv_stderr_ready, chan.recv_stderr)
            status = chan.recv_exit_status()
        except _Deadline:
            chan.close()
            raise CommandTimeout(cmd, timeout, self.answers(), out.decode(errors="replace")) from None
        except (paramiko.SSHException, EOFError, OSError) as e:
            self.close()
            raise TargetDead(f"the SSH connection to {self.p.address} was lost during `{cmd}`: "
                             f"{e or type(e).__name__}") from None
        finally:
            chan.close()
        return CommandResult(cmd, status, out.decode(errors="replace"), err.decode(errors="replace"),
                             time.monotonic() - start)

    def answers(self) -> bool:
        try:
            return self.run("true", timeout=5).ok
        except (CommandTimeout, TargetError, paramiko.SSHException, OSError):
            return False

    def put(self, local: Path, remote: str) -> None:
        with self._sftp() as sftp:
            sftp.put(str(local), remote)
            sftp.chmod(remote, local.stat().st_mode & 0o777)

    def get(self, remote: str, local: Path) -> None:
        with self._sftp() as sftp:
            sftp.get(remote, str(local))

    @contextlib.contextmanager
    def _sftp(self):
        if not self.alive():
            raise TargetDead(f"the SSH connection to {self.p.address} is closed")
        assert self.client is not None
        sftp = self.client.open_sftp()
        channel = sftp.get_channel()
        assert channel is not None
        channel.settimeout(120)
        try:
            yield sftp
        finally:
            sftp.close()


class _Deadline(Exception):
    pass


def _drain(ready, recv) -> bytes:
    data = bytearray()
    while ready():
        data += recv(1 << 16)
    return bytes(data)


def _b64(text: str) -> bytes:
    import base64
    return base64.b64decode(text)


class SshTarget(ShellHelpers):
    """A real arm64 board (or any pKVM host) over SSH. Refuses machines that do not run pKVM."""

    def __init__(self, params: SshParams, *, check_pkvm: bool = True,
                 scratch: str = "/tmp/pkvm-harness", reboot_command: str = "reboot") -> None:
        self.params = params
        self.reboot_command = reboot_command   # "reboot -f" where PID 1 is no real init
        self.name = f"board {params.address}"
        self.scratch = scratch
        self.check_pkvm = check_pkvm
        self.session = SshSession(params)
        self.session.connect()
        self.mode: str | None = None
        try:
            self.mode = self.require_pkvm() if check_pkvm else None
        except BaseException:
            self.session.close()
            raise

    @staticmethod
    def parse_url(url: str) -> tuple[str, str, int]:
        """ssh://user@host:port -> (user, host, port); user defaults to root, port to 22."""
        parts = urlsplit(url)
        if parts.scheme != "ssh" or not parts.hostname:
            raise UsageError(f"target {url!r} is not an ssh:// URL", hint="use ssh://user@host:port or qemu")
        try:
            port = parts.port or 22
        except ValueError:
            raise UsageError(f"target {url!r} has a bad port", hint="use ssh://user@host:port") from None
        return parts.username or "root", parts.hostname, port

    def run(self, cmd: str, timeout: float = 60.0) -> CommandResult:
        self.commands.append(cmd)
        return self.session.run(cmd, timeout)

    def put(self, local: Path, remote: str) -> None:
        self.session.put(local, remote)

    def get(self, remote: str, local: Path) -> None:
        self.session.get(remote, local)

    def reboot(self, timeout: float = 300.0) -> None:
        """Reboot, wait for the old connection to drop, reconnect and check pKVM again."""
        deadline = time.monotonic() + timeout
        old_boot = self.run("cat /proc/sys/kernel/random/boot_id").check().stdout.strip()
        # Detached, so the command returns before the connection goes away.
        self.run(f"(sleep 1; {self.reboot_command}) >/dev/null 2>&1 </dev/null &", timeout=15)
        while self.session.alive() and time.monotonic() < deadline:
            if not self.session.answers():
                break
            time.sleep(1)
        self.session.close()
        while True:
            self.session.connect_until(deadline)
            if self.run("cat /proc/sys/kernel/random/boot_id").stdout.strip() != old_boot:
                break
            if time.monotonic() > deadline:
                raise TargetError(f"{self.name} did not reboot within {timeout:g}s", hint="check the board")
            self.session.close()
            time.sleep(2)
        if self.check_pkvm:
            self.mode = self.require_pkvm()

    def describe(self) -> TargetInfo:
        return TargetInfo("ssh", self.name, self.mode)

    def death(self) -> str | None:
        return None if self.session.alive() and self.session.answers() else f"{self.name} stopped answering over SSH"

    def close(self) -> None:
        self.session.close()
