"""Where a kernel build's time goes: prepare, config, compile, link (and modules).

  prepare  the private source folder: copying a plain tree, applying the patch series
  config   `make tinyconfig`, merge_config.sh with the fragments, `make olddefconfig`
  compile  `make bzImage` from its start to the first line that links vmlinux from the compiled
           objects (`AR vmlinux.a` on 6.1+, `LD vmlinux.o` before); make's walk over the tree
           on a rebuild counts here too
  link     that line to make's exit: vmlinux.o, modpost, init/version-timestamp.o, the kallsyms
           link passes, vmlinux, then the bzImage (its setup and decompressor objects, the
           compressed payload: xz under tinyconfig, about 4.4 s of CPU for 6.1's 17 MB vmlinux.bin,
           and their link)
  modules  `make modules`, when the config has any

make prints one line per step ("  CC      mm/memory_hotplug.o") as the step starts; kbuild keeps
the host time each line arrived (LineClock) and splits `make bzImage` at the link line
(split_make). The phases go into build.log (a `# memhp phases:` line) and build.json.
"""
from __future__ import annotations

import os
import re
import threading
import time
from typing import IO, Dict, List, Mapping, Optional, Sequence, Tuple

PHASES = ("prepare", "config", "compile", "link", "modules")
# The first step that consumes every compiled object: the archive (6.1+) or the relocatable link.
LINK_START = re.compile(r"^\s+(?:AR|LD)\s+vmlinux(?:\.a|\.o)?\s*$")
NOTE_PREFIX = "# memhp phases:"
_NOTE_ITEM = re.compile(r"(\w+)=(\d+(?:\.\d+)?)s")

TimedLines = List[Tuple[float, str]]


def split_make(lines: Sequence[Tuple[float, str]], start: float, end: float) -> Tuple[float, float]:
    """(compile, link) seconds of one `make bzImage` run from start to end, given its output
    lines with their arrival times. No link line (nothing to relink): all of it is compile."""
    at = next((t for t, line in lines if LINK_START.match(line)), None)
    if at is None:
        return end - start, 0.0
    at = min(max(at, start), end)
    return at - start, end - at


def format_note(phases: Mapping[str, float]) -> str:
    """The build.log line: `# memhp phases: prepare=1.2s config=3.4s ...` in PHASES order."""
    items = [f"{p}={phases[p]:.1f}s" for p in PHASES if p in phases]
    return f"{NOTE_PREFIX} {' '.join(items)}"


def parse_note(log_text: str) -> Optional[Dict[str, float]]:
    """The phases of the last `# memhp phases:` line of a build.log; None when there is none."""
    found = None
    for line in log_text.splitlines():
        if line.startswith(NOTE_PREFIX):
            found = {k: float(v) for k, v in _NOTE_ITEM.findall(line[len(NOTE_PREFIX):]) if k in PHASES}
    return found


class LineClock:
    """A pipe to give a program as its output: each line goes on to `sink` unchanged and is kept
    in `lines` with the host time it arrived. Use as a context manager around the program's run."""

    def __init__(self, sink: IO[str], lines: TimedLines):
        self.sink, self.lines = sink, lines
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> IO[str]:
        r, w = os.pipe()
        self._r = os.fdopen(r, "r", errors="replace")
        self._w = os.fdopen(w, "w")
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()
        return self._w

    def _pump(self) -> None:
        with self._r:
            for line in self._r:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self.sink.write(line)
                self.sink.flush()      # build.log stays current for whoever watches it

    def __exit__(self, *exc) -> None:
        self._w.close()            # the program has exited: the reader sees EOF after the last line
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.sink.flush()
