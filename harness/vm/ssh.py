"""SSH: the guest's dropbear, through paramiko, with the host key pinned. Private to Guest.

connect() retries until the guest answers or the deadline runs out; an unknown or unrecorded
host key is an error at once. run_bytes() is bounded: a watchdog closes the whole transport
at the deadline, so a guest that accepts a channel and then wedges (paramiko's
exec_command and recv_exit_status wait without limit) gives a Hang, never a stuck memhp.
"""
from __future__ import annotations

import base64
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Tuple

import paramiko

# paramiko's transport thread logs banner/EOF errors while a guest is still booting or
# after dropbear died; memhp reports those itself, so keep them off the user's terminal.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

from harness.errors import Hang, InfraError

KEEPALIVE_S = 5          # transport keepalive; the watchdog, not this, bounds a command
WATCHDOG_GRACE_S = 2.0   # past the command's own deadline, the watchdog closes the transport


class SSHTransportError(InfraError):
    """The SSH connection itself failed (not the command)."""


class HostKeyError(InfraError):
    """The guest's host key is not the one recorded when its image was built (or none was)."""


class _PinnedKey(paramiko.MissingHostKeyPolicy):
    def __init__(self, expected: paramiko.PKey):
        self.expected = expected

    def missing_host_key(self, client, hostname, key):
        # Not an SSHException: connect() retries those, and a wrong key must stop at once.
        if key.get_name() != self.expected.get_name() or key.asbytes() != self.expected.asbytes():
            raise HostKeyError(f"guest host key mismatch for {hostname}: got {key.get_name()} "
                               f"{key.get_base64()[:16]}..., recorded {self.expected.get_base64()[:16]}...")


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
        if self.host_key is None:
            raise HostKeyError(f"no host key recorded for the guest on port {port}: refusing to trust "
                               f"whatever key it presents (rebuild the image)")
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
            left = max(0.5, deadline - time.monotonic())
            try:
                client.connect(self.host, port=self.port, username=self.user, pkey=pkey,
                               look_for_keys=False, allow_agent=False, timeout=min(5.0, left),
                               banner_timeout=min(10.0, left), auth_timeout=min(10.0, left),
                               channel_timeout=min(10.0, left))
                client.get_transport().set_keepalive(KEEPALIVE_S)
                self._client = client
                return self
            except HostKeyError:
                client.close()
                raise
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
                  abort: Optional[Callable[[], Optional[BaseException]]] = None) -> Tuple[int, bytes, bytes]:
        """Run cmd; return (status, stdout bytes, stderr bytes).

        abort() is polled while waiting; an exception it returns (e.g. the guest panicked) is
        raised at once instead of waiting out the timeout. At the deadline the transport is
        closed (the next command reconnects) and Hang is raised."""
        if self._client is None or not self.connected:
            raise SSHTransportError("SSH is not connected")
        transport = self._client.get_transport()
        expired = threading.Event()

        def watchdog() -> None:
            expired.set()
            transport.close()   # wakes every paramiko wait on this connection

        timer = threading.Timer(timeout + WATCHDOG_GRACE_S, watchdog)
        timer.daemon = True
        timer.start()
        out, err = bytearray(), bytearray()

        def hang() -> Hang:
            self.close()
            return Hang(f"guest command {cmd!r} over SSH", last_seen=out[-200:].decode(errors="replace"),
                        timeout=timeout)
        try:
            chan = self._open_channel(min(10.0, max(1.0, timeout)))
            chan.settimeout(timeout)
            chan.exec_command(cmd)
            if stdin is not None:
                chan.sendall(stdin)
                chan.shutdown_write()
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
                    raise hang()
                chan.status_event.wait(0.05)
                if chan.closed and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
            status = chan.recv_exit_status()
            chan.close()
            if status == -1:
                # paramiko's "closed without an exit status": dropbear or the whole guest went
                # away mid-command (e.g. a reset). The caller asks the Machine why.
                raise SSHTransportError(f"SSH channel closed without an exit status running {cmd!r}")
            return status, bytes(out), bytes(err)
        except (paramiko.SSHException, OSError, EOFError, socket.timeout) as e:
            # The channel's own timeout (a command that does not take its stdin) or the
            # watchdog: the deadline ran out, not the transport.
            if expired.is_set() or isinstance(e, socket.timeout):
                raise hang() from None
            raise SSHTransportError(f"SSH transport failed running {cmd!r}: {e!r}") from None
        finally:
            timer.cancel()

    def open_shell(self, term: str, cols: int, rows: int) -> paramiko.Channel:
        """An interactive shell channel (a pty in the guest), for VM.shell()."""
        if self._client is None or not self.connected:
            raise SSHTransportError("SSH is not connected")
        transport = self._client.get_transport()
        timer = threading.Timer(20.0, transport.close)   # get_pty/invoke_shell wait without limit
        timer.daemon = True
        timer.start()
        try:
            chan = transport.open_session(timeout=10)
            chan.get_pty(term=term, width=cols, height=rows)
            chan.invoke_shell()
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise SSHTransportError(f"SSH shell channel failed: {e!r}") from None
        finally:
            timer.cancel()
        chan.settimeout(10)   # a send that cannot complete in 10 s: the guest is wedged
        return chan
