"""The run matrix on real kernels (issue 14): ci/memhp-ci.sh for 2 kernels x 2 shards, merged and
compared with an unsharded `memhp run --kernel debian:6.1 --kernel debian:6.12` of the same
scenarios, and a baseline from a real run against a kernel with a planted regression.

Cost: every run is narrowed to two scenarios of two modules (SELECT), one guest each: the
four shard jobs boot one guest each, the unsharded run four, the regression runs one each on
debian-src:6.1 with tests/data/patches/0002-memhp-plant-present-off-by-one-pageblock.patch
(the same patch the replay tests build, so the build is shared through the cache).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.reports.kcidb import validate

from memhp_helpers import MEMHP, leftover_qemu, run_memhp, show

pytestmark = pytest.mark.guest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "ci" / "memhp-ci.sh"
PLANTED = ROOT / "tests" / "data" / "patches" / "0002-memhp-plant-present-off-by-one-pageblock.patch"
SELECT = "lifecycle or rejects_bad_slot"       # two modules, so two shards by module hold one each
KERNELS = ("debian:6.1", "debian:6.12")
LIFECYCLE = "dimm_lifecycle::block_sized_dimm_lifecycle"
RUN_TIMEOUT = 3600


def _pairs(doc: dict) -> dict:
    """{kernel spec: sorted (scenario, outcome)} of a report.json (one kernel or several)."""
    kds = doc["kernels"] if "kernels" in doc else [doc]
    return {k["kernel"]["spec"]: sorted((r["name"], r["outcome"]) for r in k["results"]) for k in kds}


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    """The same scenarios on both kernels in one unsharded run: (run folder, report.json, process)."""
    d = tmp_path_factory.mktemp("unsharded")
    p = run_memhp(["run", "--kernel", KERNELS[0], "--kernel", KERNELS[1], "-k", SELECT,
                   "--artifacts", str(d / "run"), "--json", str(d / "report.json")], timeout=RUN_TIMEOUT)
    assert (d / "report.json").exists(), show(p)
    assert not leftover_qemu(d), leftover_qemu(d)
    return d / "run", json.loads((d / "report.json").read_text()), p


def test_unsharded_run_on_two_kernels(unsharded):
    run, doc, p = unsharded
    where = show(p)
    assert [k["kernel"]["spec"] for k in doc["kernels"]] == list(KERNELS), where
    for k in doc["kernels"]:
        assert k["kernel"]["release"].startswith(k["kernel"]["spec"].split(":")[1] + "."), k["kernel"]
        assert sorted(r["name"] for r in k["results"]) == sorted([LIFECYCLE, "rejects::rejects_bad_slot"]), where
        assert (run / k["dir"] / "report.json").is_file()      # each kernel's folder renders alone
    outcomes = {r["outcome"] for k in doc["kernels"] for r in k["results"]}
    worst = 1 if outcomes & {"fail", "crash", "hang"} else 3 if "infra" in outcomes else 0
    assert p.returncode == doc["exit_status"] == worst, where
    # the kernel x scenario table: one column per kernel, one row per scenario
    head = next(ln for ln in p.stdout.splitlines() if ln.startswith("SCENARIO"))
    assert head.split() == ["SCENARIO", *KERNELS], where
    for k in doc["kernels"]:
        for r in k["results"]:
            assert re.search(rf"^{re.escape(r['name'])}\s+\S+\s+\S+$", p.stdout, re.M), where


def test_ci_script_shards_merge_into_the_unsharded_run(unsharded, tmp_path):
    _, full, _ = unsharded
    out = tmp_path / "out"
    summary = tmp_path / "step-summary.md"
    env = dict(os.environ, MEMHP_OUT=str(out), MEMHP_K=SELECT, MEMHP=MEMHP, GITHUB_STEP_SUMMARY=str(summary))
    jobs = []
    for kernel in KERNELS:
        for shard in ("1/2", "2/2"):
            p = subprocess.run([str(SCRIPT), "run"], env=dict(env, MEMHP_KERNEL=kernel, MEMHP_SHARD=shard),
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=RUN_TIMEOUT)
            jobs.append((kernel, shard, p))
    for kernel, shard, p in jobs:
        job = out / f"{kernel.replace(':', '_')}-shard-{shard[0]}-of-2"
        assert (job / "report.json").is_file() and (job / "junit.xml").is_file(), (kernel, shard, p.stdout[-3000:],
                                                                                  p.stderr[-3000:])
        doc = json.loads((job / "report.json").read_text())
        assert doc["shard"]["index"] == int(shard[0]) and doc["shard"]["count"] == 2
        assert p.returncode == doc["exit_status"], (p.returncode, doc["exit_status"])
        assert validate((job / "kcidb.json").read_text()) is None
    # by module: each shard holds one whole module, the same cut on both kernels
    for kernel in KERNELS:
        parts = [json.loads((out / f"{kernel.replace(':', '_')}-shard-{i}-of-2" / "report.json").read_text())
                 for i in (1, 2)]
        names = [{r["name"] for r in d["results"]} for d in parts]
        assert all(len(n) == 1 for n in names) and not names[0] & names[1], names
    assert summary.read_text().count("## memhp: kernel x scenario") == 4

    # a gap is refused: three of the four job reports
    reports = sorted(out.glob("*/report.json"))
    gap = run_memhp(["report", "--merge", *map(str, reports[:3])], timeout=120)
    assert gap.returncode == 2 and "missing: a gap" in gap.stderr, show(gap)
    over = run_memhp(["report", "--merge", *map(str, reports), str(reports[0])], timeout=120)
    assert over.returncode == 2 and "overlap" in over.stderr, show(over)

    m = subprocess.run([str(SCRIPT), "merge"], env=env, capture_output=True, text=True, timeout=600)
    assert m.returncode == 0, m.stderr
    merged = json.loads((out / "merged" / "report.json").read_text())
    assert _pairs(merged) == _pairs(full), (merged, full)          # the same scenarios, the same outcomes
    assert merged["summary"] == full["summary"] and merged["exit_status"] == full["exit_status"]
    root = ET.parse(out / "merged" / "junit.xml").getroot()
    assert root.tag == "testsuites" and [s.get("name") for s in root] == [f"memhp.{k}" for k in KERNELS]
    assert validate((out / "merged" / "kcidb.json").read_text()) is None
    assert (out / "merged" / "ktap.txt").read_text().startswith("KTAP version 1\n1..2\n")
    assert not leftover_qemu(out)


@pytest.mark.kbuild      # debian-src:6.1 + the planted patch: built once (minutes cold), then cached
def test_baseline_reports_a_planted_regression_as_new(unsharded, tmp_path):
    """Baseline: the real debian:6.1 run above (its kernel folder: one kernel). New: Debian's 6.1
    source with a planted accounting bug (present pages off by one pageblock at online). The
    lifecycle scenario is a new failure, listed first; rejects_bad_slot, not selected this time,
    is left out (not "removed"). Then that run as the baseline: the failure is known, and
    --fail-on new passes."""
    run, full, _ = unsharded
    base = run / "debian_6.1"
    assert [r["outcome"] for r in json.loads((base / "report.json").read_text())["results"]
            if r["name"] == LIFECYCLE] == ["pass"], "the baseline's lifecycle scenario must pass to show a new failure"
    new = tmp_path / "new"
    p = run_memhp(["run", "--kernel", "debian-src:6.1", "--patch", str(PLANTED), "-k", "lifecycle",
                   "--baseline", str(base), "--artifacts", str(new)], timeout=RUN_TIMEOUT)
    where = show(p)
    assert p.returncode == 1, where
    doc = json.loads((new / "report.json").read_text())
    changes = doc["baseline"]["changes"]
    assert changes[0] == {"kernel": "debian-src:6.1", "name": LIFECYCLE, "status": "new failure",
                          "old": "pass", "new": "fail"}, where
    assert [c["name"] for c in changes] == [LIFECYCLE], changes
    lines = p.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("compared with the baseline"))
    assert "1 new failure" in lines[head] and "0 removed" in lines[head], where
    assert lines[head + 1].split()[:2] == ["NEW", "FAILURE"] and LIFECYCLE in lines[head + 1], where
    bad = next(r for r in doc["results"] if r["name"] == LIFECYCLE)
    assert "present" in bad["message"].lower(), bad["message"]     # the accounting check that broke

    again = run_memhp(["run", "--kernel", "debian-src:6.1", "--patch", str(PLANTED), "-k", "lifecycle",
                       "--baseline", str(new), "--fail-on", "new", "--artifacts", str(tmp_path / "again")],
                      timeout=RUN_TIMEOUT)
    adoc = json.loads((tmp_path / "again" / "report.json").read_text())
    assert [c["status"] for c in adoc["baseline"]["changes"]] == ["still failing"], show(again)
    assert again.returncode == 0, show(again)
    assert not leftover_qemu(tmp_path)
