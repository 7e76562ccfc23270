"""`memhp run --jobs 2` against `--jobs 1` on the same kernel and selection: real guests, two
xdist workers, the same outcomes, result order, report and artifact files as the serial run.
Two modules are selected (-k), so the parallel run really has two workers; pytest.log says so."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from memhp_helpers import run_memhp, show

pytestmark = pytest.mark.guest

SELECTION = "dimm_lifecycle or numa"     # two modules, three scenarios, two boots each way


def _run(jobs: int, tmp: Path):
    art = tmp / f"jobs{jobs}"
    p = run_memhp(["run", "--kernel", "debian:6.12", "-k", SELECTION, "--jobs", str(jobs),
                   "--artifacts", str(art), "--json", str(tmp / f"jobs{jobs}.json")], timeout=1800)
    assert p.returncode == 0, show(p)
    return p, art, json.loads((tmp / f"jobs{jobs}.json").read_text())


def _files(art: Path):
    """Every artifact file, relative; pytest.log (pytest's own progress text) differs by design."""
    return sorted(str(f.relative_to(art)) for f in art.rglob("*") if f.is_file() and f.name != "pytest.log")


def _table(p) -> list:
    """The result table's rows without the time column."""
    rows = [ln.split()[:2] for ln in p.stdout.splitlines() if "::" in ln and not ln.startswith(" ")]
    return rows


def test_jobs_2_matches_jobs_1(tmp_path):
    serial, art1, doc1 = _run(1, tmp_path)
    parallel, art2, doc2 = _run(2, tmp_path)
    log2 = (art2 / "pytest.log").read_text()
    assert "created: 2/2 workers" in log2, log2[-2000:]
    assert "created:" not in (art1 / "pytest.log").read_text()
    names1 = [(r["name"], r["outcome"]) for r in doc1["results"]]
    names2 = [(r["name"], r["outcome"]) for r in doc2["results"]]
    assert len(names1) == 3 and names1 == names2, (names1, names2)
    assert doc1["summary"] == doc2["summary"] and doc1["exit_status"] == doc2["exit_status"]
    assert _table(serial) == _table(parallel) and _table(serial), serial.stdout + parallel.stdout
    assert _files(art1) == _files(art2)
    assert not list(art2.glob("results.json.gw*")), "worker result files must be merged and removed"
    for r1, r2 in zip(doc1["results"], doc2["results"]):
        assert r1["message"] == r2["message"]
        assert set(r1["measurements"]) == set(r2["measurements"]), r1["name"]
