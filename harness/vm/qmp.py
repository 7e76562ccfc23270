"""QMP: QEMU's monitor, through the qemu.qmp client on a private asyncio loop.

Events are pumped continuously into a list, so nothing is missed between waits; every
message in both directions goes to qmp.jsonl. wait_event() matches a partial dict with
a deadline; it never sleeps blindly.

Who stopped answering decides the class: a command without a reply is QEMU's monitor failing
(QMPNoReply, INFRA); an awaited event that never comes is the guest not doing what it was
asked (Hang from wait_event).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from qemu.qmp import QMPClient, Runstate
from qemu.qmp.qmp_client import ExecuteError

from harness.errors import Hang, QMPCommandError, QMPError

# Extra time fut.result() gives the client's own asyncio deadline before concluding that the
# event loop thread itself is stuck.
LOOP_GRACE_S = 5.0


class QMPNoReply(QMPError):
    """QEMU's monitor did not answer a command in time (INFRA: QEMU, not the guest)."""

    def __init__(self, command: str, timeout: float, qemu_alive: Optional[bool] = None):
        self.command, self.timeout = command, timeout
        state = "" if qemu_alive is None else (" (QEMU is still running)" if qemu_alive
                                               else " (QEMU has exited)")
        super().__init__(f"QEMU's monitor did not answer {command} within {timeout:.0f} s{state}")


def matches(event: Dict[str, Any], partial: Optional[Dict[str, Any]]) -> bool:
    """True when every key of `partial` is in `event` with an equal (or recursively matching) value."""
    if not partial:
        return True
    for k, want in partial.items():
        if k not in event:
            return False
        got = event[k]
        if isinstance(want, dict):
            if not isinstance(got, dict) or not matches(got, want):
                return False
        elif got != want:
            return False
    return True


class QMP:
    def __init__(self, sock_path: Path, transcript_path: Path):
        self.sock_path = Path(sock_path)
        self.transcript_path = Path(transcript_path)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="memhp-qmp", daemon=True)
        self._client: Optional[QMPClient] = None
        self._events: List[Dict[str, Any]] = []
        self._cond = threading.Condition()
        self._log = None
        self._pump: Optional[asyncio.Task] = None
        self._disconnected = False
        self.greeting: Optional[dict] = None
        self.alive = None   # set by connect(): is QEMU still running (for error messages)

    # lifecycle -------------------------------------------------------------
    def connect(self, timeout: float = 10.0, alive=lambda: True) -> "QMP":
        self._log = open(self.transcript_path, "a", buffering=1)
        self.alive = alive
        self._thread.start()
        deadline = time.monotonic() + timeout
        last: Optional[BaseException] = None
        while time.monotonic() < deadline and alive():
            client = QMPClient("memhp")
            try:
                self._call(client.connect(str(self.sock_path)), timeout=max(0.1, deadline - time.monotonic()))
                self._client = client
                break
            except Exception as e:  # ConnectError, FileNotFoundError, timeouts
                last = e
                time.sleep(0.02)
        if self._client is None:
            raise QMPError(f"QMP socket {self.sock_path} gave no greeting within {timeout:.0f}s: {last}")
        self.greeting = dict(self._client.greeting._raw) if self._client.greeting else None
        self._record("recv", self.greeting or {})
        self._pump = self._call(self._start_pump(), timeout=5)
        return self

    def close(self) -> None:
        if self._client is not None:
            try:
                self._call(self._client.disconnect(), timeout=3)
            except Exception:
                pass
            self._client = None
        if self._pump is not None:
            try:
                self._call(self._stop_pump(), timeout=2)
            except BaseException:
                pass
            self._pump = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=3)
        if not self._loop.is_running():
            self._loop.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "QMP":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    # internals -------------------------------------------------------------
    def _call(self, coro, timeout: float):
        """Run coro on the loop thread; bounded twice: asyncio's deadline, and ours on the
        future in case the loop thread itself is stuck. Both raise TimeoutError."""
        fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self._loop)
        try:
            return fut.result(timeout + LOOP_GRACE_S)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"QMP event loop did not finish within {timeout + LOOP_GRACE_S:.0f} s") from None

    async def _start_pump(self) -> "asyncio.Task":
        return asyncio.get_running_loop().create_task(self._pump_events())

    async def _stop_pump(self) -> None:
        self._pump.cancel()
        await asyncio.gather(self._pump, return_exceptions=True)

    async def _pump_events(self) -> None:
        client = self._client
        try:
            async for event in client.events:
                ev = dict(event._raw) if hasattr(event, "_raw") else dict(event)
                self._record("event", ev)
                with self._cond:
                    self._events.append(ev)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._disconnected = True
                self._cond.notify_all()

    def _record(self, direction: str, msg: Dict[str, Any]) -> None:
        if self._log is None:
            return
        try:
            self._log.write(json.dumps({"t": round(time.time(), 6), "dir": direction, "msg": msg},
                                       default=str) + "\n")
        except ValueError:
            pass

    # commands --------------------------------------------------------------
    def execute(self, cmd: str, args: Optional[Dict[str, Any]] = None, timeout: float = 30.0) -> Any:
        """Run a QMP command. QEMU's refusal raises QMPCommandError(error_class, desc); no
        reply within `timeout` raises QMPNoReply (INFRA), since only the monitor answers it."""
        if self._client is None:
            raise QMPError(f"QMP is not connected (command {cmd})")
        msg = {"execute": cmd, **({"arguments": args} if args else {})}
        self._record("send", msg)
        try:
            ret = self._call(self._client.execute(cmd, args), timeout)
        except ExecuteError as e:
            self._record("recv", {"error": {"class": e.error_class, "desc": e.error.error.desc}})
            raise QMPCommandError(cmd, e.error_class, e.error.error.desc, args) from None
        except (asyncio.TimeoutError, TimeoutError, concurrent.futures.TimeoutError):
            self._record("recv", {"memhp-timeout": timeout})
            raise QMPNoReply(cmd, timeout, self.alive() if self.alive else None) from None
        except Exception as e:
            self._record("recv", {"memhp-transport-error": repr(e)})
            raise QMPError(f"QMP transport failed during {cmd}: {e!r}") from None
        self._record("recv", {"return": ret})
        return ret

    # events ----------------------------------------------------------------
    def mark(self) -> int:
        """An index into the event list; pass it as `after` to only see later events."""
        with self._cond:
            return len(self._events)

    def events(self, after: int = 0) -> List[Dict[str, Any]]:
        with self._cond:
            return list(self._events[after:])

    @property
    def disconnected(self) -> bool:
        # A dropped connection leaves the client DISCONNECTING while its event iterator keeps
        # waiting, so the pump alone never notices: ask the client's run state too.
        if self._disconnected:
            return True
        client = self._client
        return client is None or client.runstate != Runstate.RUNNING

    def wait_event(self, names, match: Optional[Dict[str, Any]] = None, timeout: float = 30.0,
                   after: int = 0) -> Dict[str, Any]:
        """Wait for the first event named in `names` (str or tuple) matching `match`, after index `after`."""
        return self.wait_event_indexed(names, match, timeout, after)[1]

    def wait_event_indexed(self, names, match: Optional[Dict[str, Any]] = None, timeout: float = 30.0,
                           after: int = 0):
        """Like wait_event, but returns (index, event) so a caller can continue after it."""
        if isinstance(names, str):
            names = (names,)
        deadline = time.monotonic() + timeout
        with self._cond:
            i = after
            while True:
                while i < len(self._events):
                    ev = self._events[i]
                    i += 1
                    if ev.get("event") in names and matches(ev, match):
                        return i - 1, ev
                if self.disconnected:
                    raise QMPError(f"QMP connection closed while waiting for {'/'.join(names)}")
                left = deadline - time.monotonic()
                if left <= 0:
                    last = self._events[-1] if self._events else None
                    raise Hang(f"QMP event {'/'.join(names)} matching {match or {}}",
                               last_seen=json.dumps(last) if last else "no event at all", timeout=timeout)
                self._cond.wait(min(left, 0.5))
