"""The HTML report: self-contained, one SVG block per memory block per step, memmaps to scale,
and loaded offline by a real headless Chromium (Debian chromium-headless-shell, from the
Makefile's deps) that logs no console message and writes a screenshot."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from harness.reports import load_run, render
from harness.reports.html import BLOCK_W

from reports_helpers import FAULTS, LIFECYCLE, SUITE, derived_failed_run

BROWSERS = ("chromium-headless-shell", "chromium")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--enable-logging=stderr", "--v=0"]


class _Dom(HTMLParser):
    """Collects each <svg class=memmap-svg> with its rects, and every src/href attribute."""

    def __init__(self):
        super().__init__()
        self.svgs: List[Dict] = []
        self.refs: List[Tuple[str, str, str]] = []
        self.tags: List[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        for k in ("src", "href", "xlink:href"):
            if k in a:
                self.refs.append((tag, k, a[k] or ""))
        if tag == "svg" and "memmap-svg" in (a.get("class") or ""):
            self.svgs.append({"step": a.get("data-step"), "rects": []})
        elif tag == "rect" and self.svgs:
            self.svgs[-1]["rects"].append(a)


def _dom(text: str) -> _Dom:
    d = _Dom()
    d.feed(text)
    return d


def _steps(run_dir: Path) -> List[Tuple[str, dict]]:
    doc = json.loads((run_dir / "report.json").read_text())
    return [(r["name"], st) for r in doc["results"] for st in r["measurements"].get("memory_map", [])]


def _check_maps(dom: _Dom, run_dir: Path) -> None:
    steps = _steps(run_dir)
    assert len(dom.svgs) == len(steps), "one SVG per recorded step"
    for svg, (name, st) in zip(dom.svgs, steps):
        blocks = [r for r in svg["rects"] if "block" in (r.get("class") or "").split()]
        assert sorted(int(r["data-block"]) for r in blocks) == sorted(b["id"] for b in st["blocks"]), \
            f"{name} {st['step']}: one rect.block per memory block in report.json"
        assert svg["step"] == st["step"]
        page_ratio = st["block_size"] // st["page_size"]
        hosted = {b["id"]: b["self_hosted_pages"] for b in st["blocks"] if b["self_hosted_pages"]}
        memmaps = {int(r["data-block"]): float(r["width"]) for r in svg["rects"]
                   if "memmap" in (r.get("class") or "").split()}
        assert set(memmaps) == set(hosted), f"{name} {st['step']}: a memmap rect exactly where pages are self-hosted"
        for b, w in memmaps.items():
            assert w == pytest.approx(BLOCK_W * hosted[b] / page_ratio, abs=1e-3)


def test_maps_and_tables(tmp_path):
    run_dir = derived_failed_run(tmp_path)
    text = render(load_run(run_dir), "html")
    dom = _dom(text)
    _check_maps(dom, run_dir)
    # 6.12, 1 GiB DIMM, feature on: after online, eight 2 MiB memmaps of 2 px each; off: none.
    on_online = next(s for s in dom.svgs[:5] if s["step"] == "after online")
    widths = [float(r["width"]) for r in on_online["rects"] if r.get("class") == "memmap"]
    assert widths == [2.0] * 8
    off_online = next(s for s in dom.svgs[5:] if s["step"] == "after online")
    assert not [r for r in off_online["rects"] if r.get("class") == "memmap"]
    zones = {r["data-block"]: r["data-zone"] for r in on_online["rects"] if "block" in r.get("class", "").split()}
    assert [zones[str(b)] for b in range(32, 40)] == ["Movable"] * 8 and zones["1"] == "DMA32"
    after_removal = next(s for s in dom.svgs[:5] if s["step"] == "after removal")
    assert [r["data-state"] for r in after_removal["rects"] if r.get("class") == "ghost"] == ["removed"] * 8
    # the scenario table with expected/observed/rule on demand, the cost table, the kernel facts
    assert "<details><summary>details</summary><table><tr><th>check</th><th>expected</th>" in text
    assert "<td>Movable managed delta</td><td>32256</td><td>32768</td>" in text
    assert "<td class=num>1024 MiB</td><td>on</td>" in text and "<td class=num>4096</td>" in text
    assert "<td>struct page</td><td>64 bytes (from btf)</td>" in text
    assert "MHP_MEMMAP_ON_MEMORY=y" in text


def test_self_contained():
    for d in (FAULTS, LIFECYCLE):
        text = render(load_run(d), "html")
        dom = _dom(text)
        assert not dom.refs, f"the page must load nothing: {dom.refs}"
        assert not {"script", "link", "img", "iframe"} & set(dom.tags)
        assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in text
        assert "/.cache/" not in text and "/tmp/" not in text
        assert "\x1b" not in text, "terminal escapes from the console render as boxes"
    assert "No scenario recorded a memory map" in render(load_run(LIFECYCLE), "html")


# ---------------------------------------------------------------- a real browser
@pytest.fixture(scope="module")
def chromium() -> str:
    for b in BROWSERS:
        path = shutil.which(b)
        if path:
            return path
    pytest.fail("no headless Chromium: install Debian's chromium-headless-shell (make deps does)")


def _browse(chromium: str, page: Path, *extra: str) -> Tuple[str, str]:
    with tempfile.TemporaryDirectory(prefix="memhp-chromium-") as prof:
        p = subprocess.run([chromium, *CHROME_FLAGS, f"--user-data-dir={prof}", *extra, page.as_uri()],
                           capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, f"chromium exited {p.returncode}: {p.stderr[-800:]}"
    return p.stdout, p.stderr


def console_messages(stderr: str) -> List[str]:
    """The page's console output as Chromium logs it (`...:CONSOLE:<line>] "text", source: ...`)."""
    return [x for x in stderr.splitlines() if ":CONSOLE" in x]


def _png_size(p: Path) -> Optional[Tuple[int, int]]:
    data = p.read_bytes()[:24]
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return struct.unpack(">II", data[16:24])


def test_the_console_check_sees_errors(chromium, tmp_path):
    """Control: a page that logs to the console is caught, so a clean result means something."""
    page = tmp_path / "control.html"
    page.write_text('<!DOCTYPE html><p>x</p><script>console.error("memhp-control")</script>')
    _, err = _browse(chromium, page, "--dump-dom")
    assert any("memhp-control" in x for x in console_messages(err))


def test_chromium_loads_the_page_offline(chromium, tmp_path):
    run_dir = derived_failed_run(tmp_path)
    page = tmp_path / "report.html"
    page.write_text(render(load_run(run_dir), "html"))
    dom_text, err = _browse(chromium, page, "--dump-dom")
    assert not console_messages(err), console_messages(err)
    dom = _dom(dom_text)
    _check_maps(dom, run_dir)               # as the browser built the DOM, not as we wrote it
    shot = tmp_path / "report.png"
    _, err = _browse(chromium, page, f"--screenshot={shot}", "--window-size=1200,2400")
    assert not console_messages(err), console_messages(err)
    assert shot.is_file() and _png_size(shot) == (1200, 2400)
    assert shot.stat().st_size > 50_000, "a blank screenshot is a few kB"


def test_real_memmap_cost_table():
    """The cost table of a real 6.12 suite run: one row per recorded memmap_cost row, in order."""
    run = load_run(SUITE)
    text = render(run, "html")
    rows = [r for s in json.loads((SUITE / "report.json").read_text())["results"]
            for r in s["measurements"].get("memmap_cost", [])]
    assert rows
    table = text.split("<h2>memmap cost at hot-add</h2>")[1].split("<h2>")[0]
    assert table.count("<tr>") == len(rows) + 1
    for r in rows:
        assert (f"<td class=num>{r['dimm_mib']} MiB</td><td>{r['param']}</td>"
                f"<td class=num>{r['memfree_drop_kb']} kB</td><td class=num>{r['expected_kb']} kB</td>"
                f"<td class=num>{r['self_hosted_pages']}</td>") in table
