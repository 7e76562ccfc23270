"""A planted regression, end to end: memhp run, memhp report in every format, memhp replay and
the standalone reproducer each show the failure; on a clean kernel each shows none.

The regression is memhp's own one-line change to mm/memory_hotplug.c
(tests/data/patches/0002-memhp-plant-present-off-by-one-pageblock.patch): online_pages()
accounts one pageblock more present pages than it onlined. It is built on debian-src:6.1 with
--patch (incremental: kbuild reuses the cached object tree and rebuilds one file). The numbers
the tests expect come from the run's own facts (pageblock order, block size, struct page),
never from an earlier run. Cost, measured on the loaded 2-core host: see the README.
"""
from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from harness.reports.memmap import STEPS
from memhp_helpers import MEMHP, leftover_qemu, qemu_processes, run_memhp, show

pytestmark = [pytest.mark.guest]

REPO = Path(__file__).resolve().parents[2]
FAULT_SCENARIOS = Path(__file__).resolve().parent / "fault_scenarios"
PLANTED = REPO / "tests" / "data" / "patches" / "0002-memhp-plant-present-off-by-one-pageblock.patch"
RUN_S = 1800
REPLAY_S = 900
FORMATS = ("email", "ktap", "kcidb", "html", "json", "reproducer")
BROWSERS = ("chromium-headless-shell", "chromium")


def _report(run_dir: Path, fmt: str) -> str:
    p = run_memhp(["report", str(run_dir), "--format", fmt], timeout=120)
    assert p.returncode == 0, show(p)
    return p.stdout


def _doc(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def _facts(doc: dict) -> dict:
    return next(r["measurements"]["facts"] for r in doc["results"] if "facts" in r["measurements"])


def _reproduce(script: Path, tmp: Path, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, TMPDIR=str(tmp), **env)
    return subprocess.run(["bash", str(script)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=REPLAY_S, env=e)


def _email_checks(text: str, run_dir: Path, failed: bool) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="memhp-mbox-")) / "r.mbox"
    try:
        tmp.write_text(text)
        import mailbox
        mb = mailbox.mbox(str(tmp))
        msgs = list(mb)
        mb.close()
    finally:
        shutil.rmtree(tmp.parent)
    assert len(msgs) == 1
    msg = email.message_from_string(str(msgs[0]), policy=email.policy.default)
    body = msg.get_body(preferencelist=("plain",)).get_content()
    for sec in SECTIONS:
        assert f"\n{sec}\n{'-' * len(sec)}\n" in body, f"section {sec!r} missing:\n{body}"
    assert "Traceback" not in text and "/.cache/" not in text and str(run_dir) not in text
    # The email drops terminal escapes (the shell's "\x1b[6n" before a printk line) and CRs.
    from harness.reports.mail import _ANSI
    consoles = _ANSI.sub("", "".join(p.read_text(errors="replace") for p in run_dir.rglob("console.log")))
    argv = "".join(p.read_text() for p in run_dir.rglob("argv.txt"))
    # decode_stacktrace.sh's output is verbatim too: printk lines ("[ time] ...") and the code
    # listing of scripts/decodecode (tab-separated), in the Console section only.
    console_sec = body.split("\nConsole\n")[1].split("\nHow to reproduce\n")[0].splitlines()
    long = [x for x in body.splitlines() if len(x) > 75 and x.strip() not in consoles
            and not any(w in argv for w in [x.strip().rstrip("\\").strip().strip("'")])
            and not (x in console_sec and (x.startswith("[") or "\t" in x))]
    assert not long, "lines over 75 columns that are not verbatim log lines:\n" + "\n".join(long)
    assert msg["Subject"].startswith("[REGRESSION] mm/memory_hotplug: ") == failed, msg["Subject"]
    # Each section's content, as issue 12 lists it (the bisected form: tests/unit/test_reports_mail.py).
    doc = _doc(run_dir)
    what, kern, mach, cons, how = (_section(body, h) for h in SECTIONS)
    checks = [c for r in doc["results"] for c in r["measurements"].get("failed_checks", [])]
    if checks:
        assert all(f in what for f in ("expected:", "observed:", "rule:")) and checks[0]["name"] in " ".join(
            what.split()), what
    elif not failed:
        assert "Nothing" in what, what
    flat = " ".join(kern.split())
    assert f"release: {doc['kernel']['release']}" in flat, kern
    for sym in ("MEMCG", "HUGETLB_PAGE", "MHP_MEMMAP_ON_MEMORY", "DEBUG_VM"):
        assert f"CONFIG_{sym}" in flat, (sym, kern)
    assert re.search(r"compiler: \S*gcc", flat), kern
    words = argv.split()
    machine = words[words.index("-M") + 1] if "-M" in words else words[words.index("-machine") + 1]
    flat = " ".join(mach.split())
    assert re.search(r"QEMU: \d+\.\d+\.\d+", flat) and f"machine: {machine}, accel " in flat, mach
    assert re.search(r"memory: \d+M", flat), mach
    assert cons.strip() and ("No console excerpt" in cons) != failed, cons
    assert "memhp run --kernel" in how and ("reproduce.sh" in how) == failed, how
    assert "#regzbot" not in body and "\nBisection\n" not in body
    return body


SECTIONS = ("What failed", "The kernel", "The machine", "Console", "How to reproduce")


def _section(body: str, heading: str) -> str:
    """The text under a heading of the email, up to the next heading."""
    rest = body.split(f"\n{heading}\n{'-' * len(heading)}\n", 1)[1]
    return re.split(r"\n(?:[A-Z][a-z ]+)\n-{3,}\n", rest, maxsplit=1)[0]


def _screenshot(page: Path, shot: Path) -> str:
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    assert browser, "no headless Chromium: install Debian's chromium-headless-shell (make deps does)"
    with tempfile.TemporaryDirectory(prefix="memhp-chromium-") as prof:
        p = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={prof}",
                            f"--screenshot={shot}", "--window-size=1300,2400", page.as_uri()],
                           capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and shot.is_file() and shot.stat().st_size > 50_000, p.stderr[-800:]
    return "\n".join(x for x in p.stderr.splitlines() if ":CONSOLE" in x)


def _browser_blocks(page: Path) -> list:
    """The memory blocks the browser's DOM holds, per SVG map in page order: [[block ids], ...]
    (chromium --dump-dom: the page as the browser built it, parsed with the standard library)."""
    from html.parser import HTMLParser
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    assert browser, "no headless Chromium: install Debian's chromium-headless-shell (make deps does)"
    with tempfile.TemporaryDirectory(prefix="memhp-chromium-") as prof:
        p = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={prof}",
                            "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0 and "</html>" in p.stdout, p.stderr[-800:]
    maps: list = []

    class Blocks(HTMLParser):
        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "svg" and "memmap-svg" in (a.get("class") or "").split():
                maps.append([])
            elif tag == "rect" and "block" in (a.get("class") or "").split():
                maps[-1].append(int(a["data-block"]))
    Blocks().feed(p.stdout)
    return maps


def _check_maps_in_browser(page: Path, doc: dict) -> int:
    """One block element per memory block of report.json, in every step of every scenario's map."""
    want = [sorted(b["id"] for b in st["blocks"]) for r in doc["results"]
            for st in r["measurements"].get("memory_map", [])]
    got = [sorted(x) for x in _browser_blocks(page)]
    assert got == want, f"blocks per map in the browser {got} != report.json {want}"
    return len(want)


@pytest.mark.kbuild
def test_planted_regression_shows_in_every_report_replay_and_reproducer(artifacts, tmp_path):
    run_dir = artifacts / "planted"
    p = run_memhp(["run", "--kernel", "debian-src:6.1", "--patch", str(PLANTED), "-k", "dimm_lifecycle",
                   "--artifacts", str(run_dir)], timeout=RUN_S)
    where = show(p) + f"\nartifacts: {run_dir}"
    assert p.returncode == 1, "the planted regression must make the run fail" + where
    doc = _doc(run_dir)
    [res] = [r for r in doc["results"] if r["name"].startswith("dimm_lifecycle::")]
    assert res["outcome"] == "fail", where
    facts = _facts(doc)
    pageblock = 1 << facts["pageblock_order"]
    # The recorded check: the Movable present delta is off by exactly one pageblock.
    checks = res["measurements"]["failed_checks"]
    present = [c for c in checks if "present delta" in c["name"]]
    assert present and int(present[0]["observed"]) - int(present[0]["expected"]) == pageblock, checks
    name = present[0]["name"]
    # The memory map: every step up to the failure, the DIMM's block online in Movable.
    steps = res["measurements"]["memory_map"]
    assert [s["step"] for s in steps] == ["before add", "after add", "after online"], steps
    # The --patch series, with the kernel facts: file name, sha256, subject; a copy in the run folder.
    data = PLANTED.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    [rec] = doc["kernel"]["patches"]
    subject = next(x for x in PLANTED.read_text().splitlines() if x.startswith("Subject: "))
    assert rec["file"] == PLANTED.name and rec["sha256"] == digest and rec["subject"] \
        and subject.endswith(" " + rec["subject"]), rec
    assert (run_dir / "patches" / PLANTED.name).read_bytes() == data
    scen_dir = Path(res["artifacts"])
    assert (scen_dir / "reproduce.sh").is_file() and (run_dir / "reproduce.sh").is_file()
    assert (scen_dir / "commands.jsonl").stat().st_size > 0

    out = {fmt: _report(run_dir, fmt) for fmt in FORMATS}
    body = _email_checks(out["email"], run_dir, failed=True)
    assert name in " ".join(body.split()) and "reproduce.sh" in body
    assert re.search(r"(?m)^\s*not ok \d+ block_sized_dimm_lifecycle$", out["ktap"]) and name in out["ktap"]
    kc = json.loads(out["kcidb"])
    import kcidb_io
    kcidb_io.schema.LATEST.validate_exactly(kc)
    assert [t["status"] for t in kc["tests"] if t["path"] == "memhp.dimm_lifecycle.block_sized_dimm_lifecycle"] \
        == ["FAIL"]
    [co] = kc["checkouts"]        # KCIDB's patchset hash: sha256 over each patch's "sha256\n"
    assert co["patchset_hash"] == hashlib.sha256((digest + "\n").encode()).hexdigest()
    [pf] = co["patchset_files"]
    assert pf["name"] == PLANTED.name and base64.b64decode(pf["url"].partition(",")[2]) == data
    assert f'{PLANTED.name} ("{rec["subject"]}"' in " ".join(_section(body, "The kernel").split())
    assert json.loads(out["json"])["results"][0]["outcome"] == "fail"
    assert name in out["html"] and out["html"].count("<svg") >= len(steps)
    assert "/.cache/" not in out["html"] and str(run_dir) not in out["html"]
    assert out["reproducer"].startswith("#!/bin/bash") and name in out["reproducer"]

    page = artifacts / "planted.html"
    page.write_text(out["html"])
    console = _screenshot(page, artifacts / "planted.png")
    assert not console, console
    assert _check_maps_in_browser(page, doc) == len(steps)

    r = run_memhp(["replay", str(scen_dir)], timeout=REPLAY_S)
    assert r.returncode == 0 and "REPRODUCED" in r.stdout and name in r.stdout, show(r)
    # The state it prints where the check failed: Movable present is one block plus one pageblock.
    block_pages = steps[-1]["block_size"] // steps[-1]["page_size"]
    assert re.search(rf"(?m)^\s+present\s+{block_pages + pageblock}$", r.stdout), show(r)

    s = _reproduce(scen_dir / "reproduce.sh", tmp_path)
    assert s.returncode == 0 and "REPRODUCED" in s.stdout and name in s.stdout, show(s)
    # Control: the same script on the kernel without the patch sees other numbers and says so.
    fetched = run_memhp(["kernel", "fetch", "debian-src:6.1"], timeout=RUN_S)
    assert fetched.returncode == 0, show(fetched)
    clean = Path(fetched.stdout.strip().splitlines()[-1]) / "bzImage"
    c = _reproduce(scen_dir / "reproduce.sh", tmp_path, KERNEL=str(clean))
    assert c.returncode == 1 and "DIFFERENT" in c.stdout and "present" in c.stdout, show(c)
    assert not leftover_qemu(run_dir)


def _sigkilled_replay_takes_its_qemu_along(scen_dir: Path, tmp_path: Path) -> None:
    """memhp replay SIGKILLed (no handler, no finally runs) while its QEMU runs: the QEMU dies
    with it through the parent-death signal memhp's Machine uses, within 1 s. The replay's
    sockets are in a folder under TMPDIR, so a private TMPDIR names its QEMU. That TMPDIR is
    short (the session folder's child, not tmp_path): under a deeper one the socket paths would
    pass 108 bytes and memhp puts them under /tmp instead, where this test cannot tell its QEMU."""
    tmp = Path(tempfile.mkdtemp(prefix="rk9-", dir=tempfile.gettempdir()))
    proc = subprocess.Popen([MEMHP, "replay", str(scen_dir)], env=dict(os.environ, TMPDIR=str(tmp)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not qemu_processes(str(tmp)):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"memhp replay started no QEMU (exit {proc.returncode}): {proc.communicate()[1][-2000:]}")
            time.sleep(0.1)
        proc.kill()
        proc.wait(timeout=10)
        t0 = time.monotonic()
        while qemu_processes(str(tmp)) and time.monotonic() - t0 < 1.0:
            time.sleep(0.05)
        left = qemu_processes(str(tmp))
        print(f"SIGKILL of memhp replay: QEMU gone {time.monotonic() - t0:.2f}s after it died")
    finally:
        for pid, _ in qemu_processes(str(tmp)):     # never leave one behind, even when failing
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert not left, f"QEMU outlived a SIGKILLed memhp replay by more than 1 s: {left}"


def test_clean_kernel_shows_no_failure_anywhere(artifacts, tmp_path):
    run_dir = artifacts / "clean"
    p = run_memhp(["run", "--kernel", "debian:6.12", "-k", "test_hot_add and on-1GiB", "--artifacts", str(run_dir)],
                  timeout=RUN_S)
    assert p.returncode == 0, show(p)
    doc = _doc(run_dir)
    [res] = doc["results"]
    assert res["outcome"] == "pass" and "failed_checks" not in res["measurements"]
    assert not list(run_dir.rglob("reproduce.sh")), "a reproducer only for failed scenarios"
    # The map a reader should see: 1 GiB = block_size/size blocks, each hosting its own memmap
    # of block_pages * sizeof(struct page) bytes (2 MiB on 6.12 with 128 MiB blocks).
    facts = _facts(doc)
    online = next(s for s in res["measurements"]["memory_map"] if s["step"] == "after online")
    bs, page = online["block_size"], online["page_size"]
    want = -(-(bs // page) * facts["struct_page"] // page)
    dimm = online["dimms"][0]
    ids = range(dimm["addr"] // bs, (dimm["addr"] + dimm["size"]) // bs)
    hosted = {b["id"]: b["self_hosted_pages"] for b in online["blocks"] if b["id"] in ids}
    assert len(hosted) == (1 << 30) // bs and set(hosted.values()) == {want}, hosted

    out = {fmt: _report(run_dir, fmt) for fmt in FORMATS}
    _email_checks(out["email"], run_dir, failed=False)
    assert "not ok" not in out["ktap"]
    kc = json.loads(out["kcidb"])
    import kcidb_io
    kcidb_io.schema.LATEST.validate_exactly(kc)
    assert {t["status"] for t in kc["tests"]} == {"PASS"}
    assert ">FAIL<" not in out["html"] and ">PASS<" in out["html"]
    page = artifacts / "clean.html"
    page.write_text(out["html"])
    assert not _screenshot(page, artifacts / "clean.png")
    # the five steps, each a map in the browser
    assert [s["step"] for s in res["measurements"]["memory_map"]] == list(STEPS)
    assert _check_maps_in_browser(page, doc) == len(STEPS)

    scen_dir = Path(res["artifacts"])
    _sigkilled_replay_takes_its_qemu_along(scen_dir, tmp_path)
    r = run_memhp(["replay", str(scen_dir)], timeout=REPLAY_S)
    assert r.returncode == 0 and "SAME" in r.stdout and "differs" not in r.stdout, show(r)
    script = tmp_path / "reproduce.sh"
    script.write_text(out["reproducer"])
    s = _reproduce(script, tmp_path)
    assert s.returncode == 0 and "SAME" in s.stdout, show(s)
    assert not leftover_qemu(run_dir)


def _function_lines(source: Path, func: str) -> range:
    """The line numbers of a C function's definition in a kernel source file (its opening line to
    the first closing brace at column 0)."""
    lines = source.read_text(errors="replace").splitlines()
    start = next(i for i, x in enumerate(lines) if re.match(rf"^\w.*\b{func}\(", x))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("}"))
    return range(start + 1, end + 2)


def test_crash_email_decodes_the_stack_with_debian_debug_vmlinux(artifacts):
    """A real panic on debian:6.1 (sysrq 'c', the fault scenario f1), then the email with
    --fetch-vmlinux: Debian's linux-image-<release>-dbg (about 280 MB, once; only its vmlinux is
    cached) and linux-source-6.1's scripts/decode_stacktrace.sh turn the call trace into file:line.
    The frame checked is sysrq_handle_crash, the function sysrq 'c' runs: its line must lie inside
    that function's definition in the tree's drivers/tty/sysrq.c. A second rendering (html) finds
    the cached vmlinux by itself."""
    run_dir = artifacts / "decoded"
    p = run_memhp(["run", "--kernel", "debian:6.1", "--scenarios", str(FAULT_SCENARIOS), "-k", "f1_guest_panic",
                   "--jobs", "1", "--artifacts", str(run_dir)], timeout=RUN_S)
    assert p.returncode == 1, show(p)
    [res] = _doc(run_dir)["results"]
    assert res["outcome"] == "crash", res["message"][:500]
    e = run_memhp(["report", str(run_dir), "--format", "email", "--fetch-vmlinux"], timeout=RUN_S)
    assert e.returncode == 0, show(e)
    body = _email_checks(e.stdout, run_dir, failed=True)
    console = body.split("\nConsole\n")[1].split("\nHow to reproduce\n")[0]
    assert "decode_stacktrace.sh" in console and "Not decoded" not in console, console
    m = re.search(r"(?m)\] sysrq_handle_crash \(drivers/tty/sysrq\.c:(\d+)\)", console)
    assert m, console
    from harness.cache import cache_root
    src = next(cache_root().glob("src/linux-source-6.1_*/linux-source-6.1/drivers/tty/sysrq.c"), None)
    assert src is not None, "linux-source-6.1 is not unpacked in the cache"
    assert int(m.group(1)) in _function_lines(src, "sysrq_handle_crash"), (m.group(0), src)
    h = run_memhp(["report", str(run_dir), "--format", "html"], timeout=RUN_S)
    assert h.returncode == 0 and re.search(r"sysrq_handle_crash \(drivers/tty/sysrq\.c:\d+\)", h.stdout), show(h)
    assert not leftover_qemu(run_dir)
