"""Replay one recorded scenario on a fresh QEMU: python3's standard library only.

This module's source is embedded, as is, in the standalone reproducer script
(harness.reports.reproducer), and `memhp replay` runs it in-process: one implementation.
So: no import from memhp, no third-party package.

A plan is made from a scenario's qmp.jsonl and commands.jsonl (make_plan): every QMP command
memhp sent and every guest command it ran, in their original order, each QMP command with the
events that followed it, each guest command with its status and the accounting it showed
(summary(): MemTotal, each zone's spanned/present/managed, each block's state and
valid_zones). replay() boots QEMU with the recorded argv (only the socket paths and the SSH
port are new), sends the QMP commands over the monitor socket, waits (with a deadline) for the
same events, runs the guest commands over ssh with the image's key, and compares.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

READY_MARKER = "MEMHP-GUEST-READY"
BOOT_S = 300.0
SSH_READY_S = 90.0
QMP_REPLY_S = 30.0
EVENT_S = 60.0
STATE_CMD = ("grep MemTotal /proc/meminfo; grep -E '^Node|^ +(spanned|present|managed) ' /proc/zoneinfo; "
             "cd /sys/devices/system/memory && grep -H . memory*/state memory*/valid_zones")
SPLAT_RE = re.compile(r"(Kernel panic - not syncing|BUG: |Oops: |WARNING: |Bad page state|"
                      r"Altmap not fully unmapped)[^\n]*")
# QMP commands memhp's launcher sends itself; the replay does them at boot.
BOOT_QMP = ("qmp_capabilities", "cont")


# ---------------------------------------------------------------- plan (pure)
def _jsonl(text):
    out = []
    for line in (text or "").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def summary(text):
    """The accounting a command's output shows: {"MemTotal": kB, "Movable@0.present": n, "memory32/state": s}."""
    out, zone = {}, None
    for line in (text or "").splitlines():
        m = re.match(r"^(?:/proc/meminfo:)?MemTotal:\s+(\d+) kB", line)
        if m:
            out["MemTotal"] = int(m.group(1))
            continue
        m = re.match(r"^Node (\d+), zone\s+(\w+)", line)
        if m:
            zone = f"{m.group(2)}@{m.group(1)}"
            continue
        m = re.match(r"^\s+(spanned|present|managed)\s+(\d+)$", line)
        if m and zone:
            out.setdefault(f"{zone}.{m.group(1)}", int(m.group(2)))
            continue
        m = re.search(r"(memory\d+)/(state|valid_zones):(.*)$", line)
        if m:
            out[f"{m.group(1)}/{m.group(2)}"] = m.group(3).strip()
    return out


def make_plan(qmp_text, commands_text):
    """The steps of a recorded scenario, in time order."""
    steps = []
    msgs = _jsonl(qmp_text)
    for i, rec in enumerate(msgs):
        msg = rec.get("msg") or {}
        if rec.get("dir") != "send" or not isinstance(msg, dict) or msg.get("execute") in BOOT_QMP:
            continue
        reply, events = None, []
        for nxt in msgs[i + 1:]:
            if nxt.get("dir") == "send":
                break
            body = nxt.get("msg") or {}
            if nxt.get("dir") == "recv" and reply is None:
                reply = "error" if "error" in body else "return"
            elif nxt.get("dir") == "event":
                data = body.get("data") or {}
                dev = data.get("device") or (data.get("info") or {}).get("device")
                events.append({"event": body.get("event"), "device": dev})
        steps.append({"kind": "qmp", "t": rec.get("t", 0), "execute": msg["execute"],
                      "arguments": msg.get("arguments"), "reply": reply,
                      "events": [e for e in events if e["event"] in ("ACPI_DEVICE_OST", "DEVICE_DELETED")]})
    for rec in _jsonl(commands_text):
        if not rec.get("cmd"):
            continue
        steps.append({"kind": "cmd", "t": rec.get("t", 0), "cmd": rec["cmd"], "stdin": rec.get("stdin"),
                      "status": rec.get("status"), "seconds": max(0.0, rec.get("t_end", 0) - rec.get("t", 0)),
                      "summary": summary(rec.get("stdout", ""))})
    steps.sort(key=lambda s: s["t"])
    return steps


def comparable(plan):
    """True when the plan holds an observation to compare (a recorded snapshot's output); a run
    from before commands.jsonl kept outputs has none, and a replay of it would prove nothing."""
    return any(s["kind"] == "cmd" and "MemTotal" in s["summary"] for s in plan)


def recorded_state_at(plan, failed_at):
    """The accounting the last recorded observation before failed_at showed ({} if none)."""
    state = {}
    for s in plan:
        if failed_at and s["t"] > failed_at:
            break
        if s["kind"] == "cmd" and s["summary"]:
            state = dict(state, **s["summary"])
    return state


def rebase(state, base):
    """Counters as changes since the scenario's first whole observation: boot memory differs by a
    page or so from one boot to the next (early allocations), and what a scenario judges is
    what hotplug changed. States and counters absent from the base stay as they are."""
    return {k: v - base[k] if isinstance(v, int) and isinstance(base.get(k), int) else v
            for k, v in state.items()}


def diff(want, got):
    """[(key, recorded, replayed)] for the keys both show with different values, and the keys only one shows."""
    out = []
    for k in sorted(set(want) | set(got)):
        a, b = want.get(k, "(absent)"), got.get(k, "(absent)")
        if a != b:
            out.append((k, a, b))
    return out


def new_argv(words, kernel, initrd, workdir, port):
    """The recorded QEMU argv with fresh socket paths and SSH port (and the given kernel/initrd)."""
    out, prev = [], ""
    for w in words:
        if prev == "-kernel" and kernel:
            w = kernel
        elif prev == "-initrd" and initrd:
            w = initrd
        elif prev == "-chardev" and "socket" in w:
            name = "qmp" if "id=qmp" in w else "console"
            w = re.sub(r"path=[^,]*", f"path={os.path.join(workdir, name + '.sock')}", w)
        elif "hostfwd=" in w:
            w = re.sub(r"(hostfwd=tcp:127\.0\.0\.1:)\d+(-:22)", rf"\g<1>{port}\g<2>", w)
        out.append(w)
        prev = w if w.startswith("-") else ""
    return out


# ---------------------------------------------------------------- the live replay
class Failure(Exception):
    """The replay could not go on (QEMU, the monitor, SSH)."""


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _connect(path, timeout=15.0):
    """A unix socket QEMU listens on. The file appears at bind(), a moment before listen(): a
    connect in between is refused, so refusals are retried until the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(path)
            return sock
        except (ConnectionRefusedError, FileNotFoundError) as e:
            sock.close()
            if time.monotonic() > deadline:
                raise Failure(f"QEMU's socket {os.path.basename(path)} refused connections for {timeout:.0f} s: {e}")
            time.sleep(0.05)


class _Monitor:
    def __init__(self, path):
        self.sock = _connect(path)
        self.file = self.sock.makefile("rb")
        self.events, self.replies = [], []
        self.cond = threading.Condition()
        self.greeting = json.loads(self.file.readline())
        threading.Thread(target=self._pump, daemon=True).start()
        self.execute("qmp_capabilities")

    def _pump(self):
        for line in self.file:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self.cond:
                (self.events if "event" in msg else self.replies).append(msg)
                self.cond.notify_all()
        with self.cond:
            self.replies.append(None)
            self.cond.notify_all()

    def execute(self, cmd, args=None):
        req = {"execute": cmd}
        if args is not None:
            req["arguments"] = args
        with self.cond:
            n = len(self.replies)
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        deadline = time.monotonic() + QMP_REPLY_S
        with self.cond:
            while len(self.replies) <= n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failure(f"QEMU's monitor did not answer {cmd} within {QMP_REPLY_S:.0f} s")
                self.cond.wait(left)
            reply = self.replies[n]
        if reply is None:
            raise Failure(f"QEMU's monitor closed during {cmd}")
        return reply

    def wait_event(self, name, device, after, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(after, len(self.events)):
                    e = self.events[i]
                    data = e.get("data") or {}
                    dev = data.get("device") or (data.get("info") or {}).get("device")
                    if e.get("event") == name and (device is None or dev == device):
                        return i + 1
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)


class _Console:
    def __init__(self, path, log_path):
        self.sock = _connect(path)
        self.text = ""
        self.log = open(log_path, "w")
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            s = data.decode("utf-8", "replace")
            self.text += s
            self.log.write(s)
            self.log.flush()


def kill_with_parent():
    """A preexec_fn for QEMU: SIGKILL it when this process dies, however it dies (Linux's
    PR_SET_PDEATHSIG through ctypes), so a killed reproducer leaves no QEMU behind."""
    import ctypes
    import signal
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def child():
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)    # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:                      # the parent died before prctl took hold
            os._exit(1)
    return child


def _say(out, line=""):
    out.write(line + "\n")
    out.flush()


def replay(argv_words, plan, key, kernel=None, initrd=None, failed_at=None, checks=(), recorded_splats=(),
           workdir=None, out=sys.stdout, preexec_fn=None):
    """Boot, replay `plan`, compare. Returns (same: bool, differences: [str]). Raises Failure.
    preexec_fn: run in QEMU's child before exec (memhp replay: its parent-death signal)."""
    workdir = workdir or tempfile.mkdtemp(prefix="memhp-replay-")
    os.makedirs(workdir, exist_ok=True)
    port = _free_port()
    # Sockets in a short private folder: a unix socket path must fit 108 bytes, so /tmp when
    # $TMPDIR is too deep (this file is standalone: the rule of harness.cache.run_dir_parent()).
    tmp = tempfile.gettempdir()
    sockdir = tempfile.mkdtemp(prefix="memhp-", dir=tmp if len(tmp) <= 107 - len("/memhp-XXXXXXXX/console.sock")
                               else "/tmp")
    argv = new_argv(argv_words, kernel, initrd, sockdir, port)
    for p in (kernel, initrd):
        if p and not os.path.isfile(p):
            raise Failure(f"{p}: no such file")
    ssh = ["ssh", "-i", key, "-p", str(port), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "root@127.0.0.1"]
    diffs = []
    _say(out, f"replay: booting {os.path.basename(kernel or '?')} with the recorded QEMU command line "
              f"(logs in {workdir})")
    with open(os.path.join(workdir, "qemu.log"), "wb") as qlog:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=preexec_fn)
    try:
        deadline = time.monotonic() + 15
        socks = [os.path.join(sockdir, n) for n in ("qmp.sock", "console.sock")]
        while not all(os.path.exists(s) for s in socks):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise Failure("QEMU did not start: " + open(os.path.join(workdir, "qemu.log")).read()[-500:])
            time.sleep(0.05)
        mon = _Monitor(socks[0])
        con = _Console(socks[1], os.path.join(workdir, "console.log"))
        mon.execute("cont")
        deadline = time.monotonic() + BOOT_S
        while READY_MARKER not in con.text:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise Failure(f"the guest did not become ready within {BOOT_S:.0f} s; console ends: "
                              + con.text[-300:].replace("\n", " | "))
            time.sleep(0.2)
        deadline = time.monotonic() + SSH_READY_S
        while subprocess.run(ssh + ["true"], stdin=subprocess.DEVNULL, capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise Failure(f"no SSH to the guest within {SSH_READY_S:.0f} s")
            time.sleep(1)
        _say(out, f"replay: guest ready; {sum(s['kind'] == 'qmp' for s in plan)} QMP commands and "
                  f"{sum(s['kind'] == 'cmd' for s in plan)} guest commands to replay")
        ev_mark, shown = 0, False
        rec_base = next((s["summary"] for s in plan if s["kind"] == "cmd" and "MemTotal" in s["summary"]), {})
        rep_base = None
        for s in plan:
            if failed_at and not shown and s["t"] > failed_at:
                shown = True
                diffs += _show_state(ssh, plan, failed_at, checks, out, rec_base, rep_base or {})
            if s["kind"] == "qmp":
                reply = mon.execute(s["execute"], s["arguments"])
                got = "error" if "error" in reply else "return"
                if s["reply"] and got != s["reply"]:
                    diffs.append(f"QMP {s['execute']}: recorded {s['reply']}, replayed {got} "
                                 f"({reply.get('error', {}).get('desc', '')})")
                for e in s["events"]:
                    idx = mon.wait_event(e["event"], e["device"], ev_mark, EVENT_S)
                    if idx is None:
                        diffs.append(f"QMP event {e['event']} ({e['device'] or 'no device'}) after {s['execute']} "
                                     f"did not come within {EVENT_S:.0f} s")
                    else:
                        ev_mark = idx
            else:
                stdin = None
                if s.get("stdin"):
                    import base64
                    stdin = base64.b64decode(s["stdin"])
                timeout = max(60.0, 5 * s["seconds"])
                try:
                    res = subprocess.run(ssh + [s["cmd"]], input=stdin if stdin is not None else b"",
                                         capture_output=True, timeout=timeout)
                except subprocess.TimeoutExpired:
                    diffs.append(f"guest command {s['cmd'][:60]!r} did not end within {timeout:.0f} s")
                    continue
                if s["status"] is not None and res.returncode != s["status"]:
                    diffs.append(f"guest command {s['cmd'][:60]!r}: recorded status {s['status']}, "
                                 f"replayed {res.returncode}")
                # Only whole observations (memhp's snapshots) are compared: a poll may see less.
                observed = summary(res.stdout.decode("utf-8", "replace")) if "MemTotal" in s["summary"] else {}
                if observed and rep_base is None:
                    rep_base = observed
                for k, a, b in diff(rebase(s["summary"], rec_base) if observed else {},
                                    rebase(observed, rep_base or {})):
                    diffs.append(f"{k} (change since the first observation): recorded {a}, replayed {b} "
                                 f"(after {s['cmd'][:40]!r}...)")
        if not shown and (failed_at or checks):   # checks judged at the end: the state at the end
            diffs += _show_state(ssh, plan, failed_at, checks, out)
        splats = [m.group(0) for m in SPLAT_RE.finditer(con.text)]
        kinds = sorted({_kind(x) for x in splats})
        want = sorted({_kind(x) for x in recorded_splats})
        if kinds != want:
            diffs.append(f"console splats: recorded {want or 'none'}, replayed {kinds or 'none'}")
        for x in splats[:3]:
            _say(out, f"replay: console: {x}")
    finally:
        try:
            proc.terminate()
            proc.wait(10)
        except Exception:
            proc.kill()
            proc.wait(10)
        for n in ("qmp.sock", "console.sock"):
            if os.path.exists(os.path.join(sockdir, n)):
                os.unlink(os.path.join(sockdir, n))
        os.rmdir(sockdir)
    return not diffs, diffs


def _kind(line):
    m = SPLAT_RE.match(line)
    return m.group(1).strip(": ") if m else line


def _show_state(ssh, plan, failed_at, checks, out, rec_base=None, rep_base=None):
    """Print the guest's accounting where memhp's check failed, next to what memhp saw there."""
    res = subprocess.run(ssh + [STATE_CMD], stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    text = res.stdout.decode("utf-8", "replace")
    _say(out, "replay: the guest's state where memhp's check failed:")
    for line in text.splitlines():
        _say(out, "    " + line)
    for c in checks:
        _say(out, f"replay: memhp's failed check there: {c.get('name')}: expected {c.get('expected')}, "
                  f"observed {c.get('observed')} ({c.get('rule')})")
    want = rebase(recorded_state_at(plan, failed_at), rec_base or {})
    got = rebase(summary(text), rep_base or {})
    return [f"at the failure: {k} (change since the first observation): recorded {a}, replayed {b}"
            for k, a, b in diff(want, got)
            if a != "(absent)" and b != "(absent)"]


def verdict(same, diffs, checks, splats):
    """One paragraph: whether the same observations came back, and what that means for memhp's verdict."""
    lines = [f"  differs: {d}" for d in diffs[:20]] + ([f"  ... and {len(diffs) - 20} more"] if len(diffs) > 20 else [])
    if same and checks:
        head = (f"REPRODUCED: the same observations came back, so the same check fails: {checks[0]['name']}: "
                f"expected {checks[0]['expected']}, observed {checks[0]['observed']}")
    elif same and splats:
        head = f"REPRODUCED: the same splat came back: {splats[0]}"
    elif same:
        head = "SAME: the same observations came back (memhp recorded no failure in this scenario)"
    else:
        head = f"DIFFERENT: {len(diffs)} observation(s) did not come back as recorded"
    return "\n".join(lines + [head])
