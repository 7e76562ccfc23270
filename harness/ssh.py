"""SSH: the guest's dropbear, through paramiko, with the host key pinned.

connect() retries until the guest answers or the deadline runs out; run() returns a
CommandResult, the same type the serial console's run() returns.
"""
from __future__ import annotations

import base64
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import paramiko

# paramiko's transport thread logs banner/EOF errors while a guest is still booting or
# after dropbear died; memhp reports those itself, so keep them off the user's terminal.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

from harness.errors import GuestCommandError, Hang, InfraError


@dataclass(frozen=True)
class CommandResult:
    cmd: str
    status: int
    stdout: str
    stderr: str
    transport: str = "ssh"

    @property
    def ok(self) -> bool:
        return self.status == 0

    def check(self) -> "CommandResult":
        if self.status != 0:
            raise GuestCommandError(self.cmd, self.status, self.stdout, self.stderr)
        return self


class SSHTransportError(InfraError):
    """The SSH connection itself failed (not the command)."""


class _PinnedKey(paramiko.MissingHostKeyPolicy):
    def __init__(self, expected: Optional[paramiko.PKey]):
        self.expected = expected

    def missing_host_key(self, client, hostname, key):
        if self.expected is None:
            return
        if key.get_name() != self.expected.get_name() or key.asbytes() != self.expected.asbytes():
            raise paramiko.SSHException(f"guest host key mismatch for {hostname}: got {key.get_name()} "
                                        f"{key.get_base64()[:16]}...")


def _parse_pub(line: str) -> Optional[paramiko.PKey]:
    if not line:
        return None
    parts = line.split()
    if len(parts) < 2:
        return None
    return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))


class SSH:
    def __init__(self, host: str, port: int, key_path: Path, host_key_pub: str = "", user: str = "root"):
        self.host, self.port, self.user = host, port, user
        self.key_path = Path(key_path)
        self.host_key = _parse_pub(host_key_pub)
        self._client: Optional[paramiko.SSHClient] = None

    def connect(self, timeout: float = 60.0, alive=lambda: True) -> "SSH":
        """Retry until dropbear answers. `alive()` false (QEMU died) stops early."""
        pkey = paramiko.Ed25519Key.from_private_key_file(str(self.key_path))
        deadline = time.monotonic() + timeout
        last: Optional[BaseException] = None
        while time.monotonic() < deadline:
            if not alive():
                raise InfraError(f"QEMU went away before SSH on port {self.port} answered (last: {last})")
            client = paramiko.SSHClient()
            client.set_missing_host_key_policy(_PinnedKey(self.host_key))
            try:
                client.connect(self.host, port=self.port, username=self.user, pkey=pkey,
                               look_for_keys=False, allow_agent=False,
                               timeout=min(5.0, max(0.5, deadline - time.monotonic())),
                               banner_timeout=10, auth_timeout=10)
                self._client = client
                return self
            except (paramiko.SSHException, OSError, EOFError) as e:
                last = e
                client.close()
                time.sleep(0.2)
        raise Hang(f"SSH on 127.0.0.1:{self.port}", last_seen=repr(last), timeout=timeout)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "SSH":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        t = self._client.get_transport() if self._client else None
        return bool(t and t.is_active())

    def _open_channel(self, timeout: float = 10.0):
        # dropbear occasionally refuses a channel right after boot ("Unable to open channel");
        # one retry on the same connection covers it.
        try:
            return self._client.get_transport().open_session(timeout=timeout)
        except paramiko.ChannelException:
            time.sleep(0.2)
            return self._client.get_transport().open_session(timeout=timeout)

    def run_bytes(self, cmd: str, timeout: float = 60.0, stdin: Optional[bytes] = None,
                  abort: Optional[Callable[[], Optional[BaseException]]] = None):
        """Run cmd; return (status, stdout bytes, stderr bytes).

        abort() is polled while waiting; an exception it returns (e.g. the guest panicked) is
        raised at once instead of waiting out the timeout."""
        if self._client is None:
            raise SSHTransportError("SSH is not connected")
        try:
            chan = self._open_channel(min(10.0, max(1.0, timeout)))
            chan.settimeout(timeout)
            chan.exec_command(cmd)
            if stdin is not None:
                chan.sendall(stdin)
                chan.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + timeout
            while True:
                if chan.recv_ready():
                    out += chan.recv(65536)
                    continue
                if chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                    continue
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if abort is not None:
                    stop = abort()
                    if stop is not None:
                        chan.close()
                        raise stop
                if time.monotonic() > deadline:
                    chan.close()
                    raise Hang(f"guest command {cmd!r} over SSH", last_seen=out[-200:].decode(errors='replace'),
                               timeout=timeout)
                chan.status_event.wait(0.05)
                if chan.closed and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
            status = chan.recv_exit_status()
            chan.close()
            return status, bytes(out), bytes(err)
        except (paramiko.SSHException, OSError, EOFError, socket.timeout) as e:
            raise SSHTransportError(f"SSH transport failed running {cmd!r}: {e!r}") from None

    def run(self, cmd: str, timeout: float = 60.0, stdin: Optional[bytes] = None,
            abort: Optional[Callable[[], Optional[BaseException]]] = None) -> CommandResult:
        status, out, err = self.run_bytes(cmd, timeout, stdin, abort)
        return CommandResult(cmd, status, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))
