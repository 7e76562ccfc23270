"""Console: the guest's serial line (ttyS0), over QEMU's unix-socket chardev.

A reader thread drains the socket continuously (a full socket would stall the guest's
printk), appends every byte to console.log, and keeps the text for waits and splat checks.
pexpect's fdspawn owns the file descriptor; interact() gives a human the serial shell.
Every write has a deadline (send()).
"""
from __future__ import annotations

import os
import re
import select
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Optional, Pattern, Tuple, Union

import pexpect.fdpexpect

from harness.errors import GuestCrash, Hang, InfraError

PANIC_RE = re.compile(r"Kernel panic - not syncing[^\r\n]*")
SEND_TIMEOUT_S = 10.0
ARRIVALS_MAX = 20000


class Console:
    def __init__(self, sock_path: Path, log_path: Path):
        self.sock_path = Path(sock_path)
        self.log_path = Path(log_path)
        self._sock: Optional[socket.socket] = None
        self._child: Optional[pexpect.fdpexpect.fdspawn] = None
        self._log = None
        self._buf: list = []
        self._text = ""
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._eof = False
        self._thread: Optional[threading.Thread] = None
        self._paused_reader = threading.Event()
        # (text length after a chunk, host monotonic time it arrived), for the boot's first
        # chunks only: `memhp bench` times console lines with it; capped so it never grows.
        self.arrivals: list = []

    # lifecycle -------------------------------------------------------------
    def connect(self, timeout: float = 10.0) -> "Console":
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(self.sock_path))
                break
            except OSError as e:
                last = e
                s.close()
                time.sleep(0.02)
        else:
            raise InfraError(f"console socket {self.sock_path} did not accept a connection "
                             f"within {timeout:.0f}s: {last}")
        self._sock = s
        self._child = pexpect.fdpexpect.fdspawn(s.fileno(), encoding=None, timeout=None)
        self._log = open(self.log_path, "ab", buffering=0)
        self._thread = threading.Thread(target=self._reader, name="memhp-console", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "Console":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    def _reader(self) -> None:
        fd = self._sock.fileno()
        while not self._closed.is_set():
            if self._paused_reader.is_set():
                time.sleep(0.05)
                continue
            try:
                r, _, _ = select.select([fd], [], [], 0.1)
            except (OSError, ValueError):
                break
            if not r:
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not data:
                with self._cond:
                    self._eof = True
                    self._cond.notify_all()
                break
            if self._log is not None:
                try:
                    self._log.write(data)
                except (OSError, ValueError):
                    pass
            with self._cond:
                self._text += data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "")
                if len(self.arrivals) < ARRIVALS_MAX:
                    self.arrivals.append((len(self._text), time.monotonic()))
                self._cond.notify_all()

    # reading ---------------------------------------------------------------
    @property
    def text(self) -> str:
        with self._cond:
            return self._text

    @property
    def eof(self) -> bool:
        return self._eof

    def offset(self) -> int:
        with self._cond:
            return len(self._text)

    def arrived(self, offset: int) -> Optional[float]:
        """Host monotonic time at which the text at `offset` arrived; None if not recorded."""
        with self._cond:
            return next((t for end, t in self.arrivals if end > offset), None)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.text.splitlines()[-lines:])

    def wait_for(self, pattern: Union[str, Pattern], timeout: float, since: int = 0,
                 what: Optional[str] = None, crash_on_panic: bool = True) -> "re.Match":
        """Wait until pattern appears in console text after offset `since`.

        Raises GuestCrash on a kernel panic, Hang on the deadline, InfraError if the
        console closed (QEMU went away) first.
        """
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self._text, since)
                if m:
                    return m
                if crash_on_panic:
                    crash = self._panic_locked(since)
                    if crash:
                        raise crash
                if self._eof:
                    raise InfraError(f"console closed (QEMU exited?) while waiting for "
                                     f"{what or rx.pattern}; console tail:\n{self._tail_locked()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Hang(what or f"console output matching {rx.pattern!r}",
                               last_seen=self._tail_locked(1), console_tail=self._tail_locked(),
                               timeout=timeout)
                self._cond.wait(min(left, 0.5))

    def panic(self, since: int = 0) -> Optional[GuestCrash]:
        """A GuestCrash quoting the panic line and the console before it, if the kernel panicked."""
        with self._cond:
            return self._panic_locked(since)

    def _panic_locked(self, since: int) -> Optional[GuestCrash]:
        p = PANIC_RE.search(self._text, since)
        if not p:
            return None
        before = self._text[max(0, p.start() - 3000):p.start()]
        return GuestCrash("panic", p.group(0) + "\n--- console before it ---\n" + before.strip())

    def _tail_locked(self, lines: int = 30) -> str:
        return "\n".join(self._text.splitlines()[-lines:])

    # writing ---------------------------------------------------------------
    def send(self, data: Union[str, bytes], timeout: float = SEND_TIMEOUT_S) -> None:
        """Write to the serial line within `timeout`. QEMU stops reading the socket while the
        guest's UART is full, so a guest that does not drain its serial port is a Hang."""
        if isinstance(data, str):
            data = data.encode()
        if self._sock is None:
            raise InfraError("console is not connected")
        view, deadline = memoryview(data), time.monotonic() + timeout
        try:
            while view:
                left = deadline - time.monotonic()
                _, w, _ = select.select([], [self._sock], [], max(0.0, left))
                if not w:
                    raise Hang("the serial console to accept input", timeout=timeout,
                               last_seen=f"{len(data) - len(view)} of {len(data)} bytes written",
                               console_tail=self.tail())
                # MSG_DONTWAIT: never block past the deadline, and leave the socket blocking
                # for the reader thread and interact().
                view = view[self._sock.send(view, socket.MSG_DONTWAIT):]
        except BlockingIOError:
            return self.send(bytes(view), max(0.0, deadline - time.monotonic()))
        except OSError as e:
            raise InfraError(f"console write failed: {e}") from e

    def run(self, cmd: str, timeout: float = 30.0) -> Tuple[int, str]:
        """Run a shell command on the serial root shell; returns (exit status, output with
        stderr merged). Guest wraps it in a CommandResult.

        Output shares the line with kernel messages, so it is a fallback, not the main path.
        """
        tag = uuid.uuid4().hex[:10]
        # The quotes split the markers, so the tty's echo of this line never matches.
        line = (f"echo '@@S''{tag}'; ( {cmd} ) 2>&1; echo \"@@E\"'{tag}'=$?\n")
        since = self.offset()
        self.send(line, timeout=min(timeout, SEND_TIMEOUT_S))
        rx = re.compile(rf"@@S{tag}\n(.*?)@@E{tag}=(\d+)", re.S)
        m = self.wait_for(rx, timeout, since=since, what=f"serial command {cmd!r} to finish")
        return int(m.group(2)), m.group(1)

    def interact(self) -> None:
        """Hand the serial line to the user (Ctrl-] leaves)."""
        self._paused_reader.set()
        try:
            self._child.interact(escape_character="\x1d")
        finally:
            self._paused_reader.clear()
