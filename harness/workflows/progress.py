"""Progress of a long `memhp run` on a terminal: one line, redrawn in place.

    [debian:6.12] 3/14 done, 11 left, ETA 4m10s | hot_add::hot_add[on-1GiB] 25s

The ETA adds up the recorded duration of every scenario still to run (from --durations-from or
--baseline; a scenario never recorded counts the mean of those finished in this run), divided by
the parallel guests, minus what the running scenario has already used. A scenario that does not
pass leaves a permanent line above the live one. Without a terminal this class is not used and
each finished scenario prints one plain line (the pytest plugin's live lines), as always. It
writes to the terminal only, never into a report or a file.
"""
from __future__ import annotations

import shutil
import statistics
import threading
import time
from typing import Dict, List, Mapping, Optional, Sequence, TextIO

REFRESH_S = 1.0     # how often the running scenario's clock is redrawn


def fmt_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta(remaining: Sequence[str], durations: Mapping[str, float], finished: Sequence[float], jobs: int = 1,
        running_for: float = 0.0) -> Optional[float]:
    """Seconds left: recorded durations of the remaining scenarios (the mean of this run's finished
    ones for a scenario never recorded), over `jobs` guests, less the running one's time so far.
    None when a remaining scenario has no estimate at all. Pure."""
    fallback = statistics.fmean(finished) if finished else None
    total = 0.0
    for name in remaining:
        d = durations.get(name, fallback)
        if d is None:
            return None
        total += d
    return max(0.0, total / max(1, jobs) - running_for)


class Progress:
    """A pytest plugin object for the controller session; works with xdist (it reads reports)."""

    def __init__(self, kernels: Sequence[str], names_per_kernel: int, durations: Mapping[str, float],
                 stream: TextIO, jobs: int = 1):
        self.kernels, self.per_kernel = list(kernels), names_per_kernel
        self.durations, self.stream, self.jobs = dict(durations), stream, jobs
        self.kernel, self.k_index = "", -1
        self.names: Dict[str, str] = {}             # nodeid -> scenario name
        self.pending: List[str] = []
        self.selection: List[str] = []
        self.done = 0
        self.finished: List[float] = []
        self.took: Dict[str, float] = {}
        self.outcome: Dict[str, str] = {}
        self.running: Dict[str, float] = {}         # nodeid -> monotonic start
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: Optional[threading.Thread] = None

    # ------------------------------------------------ driven by the matrix
    def start_kernel(self, spec: str, names: Sequence[str]) -> None:
        with self.lock:
            self.kernel, self.k_index = spec, self.k_index + 1
            self.pending, self.selection = list(names), list(names)
            self.running.clear()
        if self._ticker is None:
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, name="memhp-progress", daemon=True)
            self._ticker.start()

    def map_nodeids(self, mapping: Mapping[str, str]) -> None:
        self.names.update(mapping)

    def end_kernel(self) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
            self._ticker = None
        with self.lock:
            self._write("\r\x1b[K")

    # ------------------------------------------------ pytest hooks
    def pytest_runtest_logstart(self, nodeid, location):
        with self.lock:
            self.running[nodeid] = time.monotonic()
        self._draw()

    def pytest_runtest_logreport(self, report):
        nid = report.nodeid
        with self.lock:
            self.took[nid] = self.took.get(nid, 0.0) + float(getattr(report, "duration", 0.0) or 0.0)
            for title, content in getattr(report, "sections", ()):
                if title == "memhp outcome":
                    self.outcome[nid] = content.strip().lower()
            if report.skipped:
                self.outcome.setdefault(nid, "skip")
            if report.when != "teardown":
                return
            self.running.pop(nid, None)
            name = self.names.get(nid, nid)
            if name in self.pending:
                self.pending.remove(name)
            self.done += 1
            self.finished.append(self.took[nid])
            out = self.outcome.get(nid, "pass")
            if out not in ("pass", "skip"):
                self._write(f"\r\x1b[K  {out.upper():<6} [{self.kernel}] {name} ({self.took[nid]:.1f}s)\n")
        self._draw()

    # ------------------------------------------------ drawing
    def line(self, now: Optional[float] = None) -> str:
        now = time.monotonic() if now is None else now
        later = max(0, len(self.kernels) - self.k_index - 1) * self.per_kernel
        left = len(self.pending) + later
        ran = max((now - t for t in self.running.values()), default=0.0)
        e = eta(self.pending, self.durations, self.finished, self.jobs, ran)
        if e is not None and later:     # the kernels still to come run the same scenarios
            per = eta(self.selection, self.durations, self.finished, self.jobs)
            e = None if per is None else e + per * (len(self.kernels) - self.k_index - 1)
        cur = [self.names.get(n, n) for n in self.running]
        what = f" | {cur[-1]} {fmt_seconds(ran)}" if cur else ""
        return (f"[{self.kernel}] {self.done}/{self.done + left} done, {left} left, "
                f"ETA {fmt_seconds(e) if e is not None else '?'}{what}")

    def _draw(self) -> None:
        with self.lock:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self._write("\r\x1b[K" + self.line()[:max(20, width)])

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def _tick(self) -> None:
        while not self._stop.wait(REFRESH_S):
            self._draw()
