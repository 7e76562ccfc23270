"""KTAP v1 output, parsed by the kernel's own tools/testing/kunit/kunit_parser.py.

The parser comes from Debian's linux-source: an extracted tree under the memhp cache when one
is there (kernel builds leave one), else `apt-get download linux-source-6.1` once, keeping
only tools/testing/kunit/ under <cache>/kunit-parser/. No parser means a failed test, not a
skip: the KTAP output must be proven parsable.
"""
from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from harness.cache import cache_root
from harness.reports import load_run, render
from harness.reports.ktap import diagnostics

from reports_helpers import FAULTS, LEAK_FAIL, SUITE, derived_failed_run, expected_counts

KUNIT_FILES = ("kunit_parser.py", "kunit_printer.py")


def _fetch_kunit(dest: Path) -> Path:
    """tools/testing/kunit from linux-source-6.1 via apt-get download, into dest."""
    with tempfile.TemporaryDirectory(prefix="memhp-kunit-") as tmp:
        t = Path(tmp)
        p = subprocess.run(["apt-get", "download", "linux-source-6.1"], cwd=t, capture_output=True, text=True,
                           timeout=1800)
        debs = list(t.glob("linux-source-6.1_*.deb"))
        if p.returncode != 0 or not debs:
            pytest.fail(f"cannot fetch kunit_parser.py: apt-get download linux-source-6.1 failed: "
                        f"{(p.stderr or p.stdout).strip()[-300:]}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(t / "x")], check=True, timeout=600)
        src_tar = next((t / "x").rglob("linux-source-6.1.tar.*"))
        with tarfile.open(src_tar) as tf:
            for m in tf:
                if "/tools/testing/kunit/" in m.name and m.name.rsplit("/", 1)[-1] in KUNIT_FILES:
                    m.name = m.name.rsplit("/", 1)[-1]
                    tf.extract(m, dest)
    return dest


@pytest.fixture(scope="module")
def kunit_parser():
    cached = cache_root() / "kunit-parser"
    found = next((p.parent for p in sorted(cache_root().glob("src/linux-source-*/linux-source-*/tools/testing/"
                                                               "kunit/kunit_parser.py"))), None)
    if found is None:
        if not all((cached / f).is_file() for f in KUNIT_FILES):
            tmp = cached.with_name("kunit-parser.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _fetch_kunit(tmp)
            shutil.rmtree(cached, ignore_errors=True)
            tmp.rename(cached)
        found = cached
    sys.path.insert(0, str(found))
    try:
        for m in ("kunit_parser", "kunit_printer"):
            sys.modules.pop(m, None)
        yield importlib.import_module("kunit_parser")
    finally:
        sys.path.remove(str(found))


def _parse(kp, text: str):
    return kp.parse_run_tests(text.splitlines())


def test_fault_run_parses_with_the_expected_counts(kunit_parser):
    run = load_run(FAULTS)
    text = render(run, "ktap")
    assert text.startswith("KTAP version 1\n1..1\n")
    top = _parse(kunit_parser, text)
    assert top.counts.errors == 0, text
    # faults-6.12: f1 CRASH, f2 HANG, f3/f4 INFRA, f5/f6 PASS
    assert (top.counts.passed, top.counts.failed, top.counts.skipped, top.counts.crashed) == (2, 4, 0, 0)
    assert [t.name for t in top.subtests] == ["injected_faults"]
    sub = top.subtests[0]
    assert [t.name for t in sub.subtests] == [s.case for s in run.scenarios]
    assert sub.status == kunit_parser.TestStatus.FAILURE
    lines = text.splitlines()
    assert "  not ok 2 f2_guest_stops_responding # TIMEOUT" in lines
    assert any(x.startswith("  not ok 3 f3_qemu_sigkilled # ERROR") for x in lines)
    # The crash's diagnostics quote the splat, before its result line.
    crash = lines.index("  not ok 1 f1_guest_panic")
    assert any("Kernel panic - not syncing: sysrq triggered crash" in x for x in lines[:crash])


def test_failed_run_counts_checks_and_skip(kunit_parser, tmp_path):
    run = load_run(derived_failed_run(tmp_path))
    text = render(run, "ktap")
    top = _parse(kunit_parser, text)
    assert top.counts.errors == 0, text
    assert (top.counts.passed, top.counts.failed, top.counts.skipped) == (2, 1, 1)
    assert [t.name for t in top.subtests] == ["dimm_lifecycle", "hot_add", "param"]
    status = {t.name: t.status for t in top.subtests}
    assert status == {"dimm_lifecycle": kunit_parser.TestStatus.FAILURE,
                      "hot_add": kunit_parser.TestStatus.SUCCESS, "param": kunit_parser.TestStatus.SKIPPED}
    # expected / observed / rule of each failed check, as diagnostics the parser keeps in the test's log
    failed = top.subtests[0].subtests[0]
    log = "\n".join(failed.log)
    assert "Movable managed delta: expected 32256, observed 32768" in log
    assert "MemTotal delta (kB): expected 129024, observed 131072" in log
    assert "rule: MemTotal grows by the managed pages in kB" in log
    assert "  ok 1 readback[force] # SKIP force reads back on 6.6+ only" in text.splitlines()


def test_console_phrases_that_end_kunit_parsing_are_defused(kunit_parser, tmp_path):
    """kunit_parser stops at 'reboot: System halted' anywhere in a line; a quoted console must not."""
    run = load_run(FAULTS)
    s = run.scenarios[2]
    from dataclasses import replace
    s2 = replace(s, message="QEMU exited\n[  9.1] reboot: System halted\n# Subtest: fake")
    run2 = replace(run, scenarios=run.scenarios[:2] + (s2,) + run.scenarios[3:])
    diags = diagnostics(s2, run2)
    assert not any("reboot: System halted" in d for d in diags)
    top = _parse(kunit_parser, render(run2, "ktap"))
    assert top.counts.errors == 0
    assert top.counts.passed + top.counts.failed == len(run.scenarios)


def test_no_paths_and_no_hash_in_names(tmp_path):
    run = load_run(FAULTS)
    text = render(run, "ktap")
    assert "/tmp/" not in text and "/.cache/" not in text
    for line in text.splitlines():
        body = line.strip()
        if body.startswith(("ok ", "not ok ")):
            name_part = body.split(" # ")[0]
            assert "#" not in name_part, line


def test_real_fail(kunit_parser):
    text = render(load_run(LEAK_FAIL), "ktap")
    top = _parse(kunit_parser, text)
    assert top.counts.errors == 0
    assert (top.counts.passed, top.counts.failed, top.counts.skipped) == (0, 1, 0)
    log = "\n".join(top.subtests[0].subtests[0].log)
    assert "free memory given back by the removals, mean over the cycles (kB): expected '[-60, 68]', " \
           "observed -151.4" in log


@pytest.mark.parametrize("run_dir", [FAULTS, LEAK_FAIL, SUITE], ids=lambda p: p.name)
def test_counts_match_the_summary(kunit_parser, run_dir):
    run = load_run(run_dir)
    top = _parse(kunit_parser, render(run, "ktap"))
    assert top.counts.errors == 0
    want = expected_counts(run_dir)
    assert {"passed": top.counts.passed, "failed": top.counts.failed, "skipped": top.counts.skipped} == want
    assert [t.name for t in top.subtests] == [m for m, _ in run.modules]
    assert [len(t.subtests) for t in top.subtests] == [len(s) for _, s in run.modules]
