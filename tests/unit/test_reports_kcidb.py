"""KCIDB v5 output: every document validated with kcidb-io's own schema (validate_exactly)."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

import kcidb_io      # the `test` extra (pip install -e .[test]); missing, the tests fail rather than skip

from harness.reports import load_run, render
from harness.reports.kcidb import STATUS, document, drop_nulls, kcidb_path

from reports_helpers import FAULTS, LEAK_FAIL, LIFECYCLE, SUITE, derived_failed_run


def _validate(doc) -> None:
    kcidb_io.schema.LATEST.validate_exactly(doc)


def _no_nulls(v) -> bool:
    if v is None:
        return False
    if isinstance(v, dict):
        return all(_no_nulls(x) for x in v.values())
    if isinstance(v, list):
        return all(_no_nulls(x) for x in v)
    return True


@pytest.fixture(params=["faults", "lifecycle", "leak-fail", "suite", "failed"])
def run(request, tmp_path):
    path = {"faults": FAULTS, "lifecycle": LIFECYCLE, "leak-fail": LEAK_FAIL, "suite": SUITE}.get(request.param) or \
        derived_failed_run(tmp_path)
    return load_run(path)


def test_every_document_validates(run):
    text = render(run, "kcidb")
    doc = json.loads(text)
    _validate(doc)
    assert _no_nulls(doc)
    assert doc["version"] == {"major": 5, "minor": 3}
    assert len(doc["checkouts"]) == len(doc["builds"]) == 1
    assert len(doc["tests"]) == len(run.scenarios)
    assert len({t["id"] for t in doc["tests"]}) == len(doc["tests"])
    b = doc["builds"][0]
    assert b["checkout_id"] == doc["checkouts"][0]["id"]
    assert all(t["build_id"] == b["id"] for t in doc["tests"])
    assert b["compiler"].startswith("x86_64-linux-gnu-gcc-12")
    assert b["misc"]["config"]["CONFIG_MHP_MEMMAP_ON_MEMORY"] == "y"
    assert doc["checkouts"][0]["patchset_hash"] == ""       # no patches in these runs


def test_the_validator_is_not_vacuous(run):
    doc = document(run)
    bad = json.loads(json.dumps(doc))
    bad["tests"][0]["status"] = None
    with pytest.raises(Exception):
        _validate(bad)
    bad = json.loads(json.dumps(doc))
    bad["tests"][0]["memhp_outcome"] = "PASS"                # an extra property
    with pytest.raises(Exception):
        _validate(bad)


def test_outcome_map_and_excerpts():
    run = load_run(FAULTS)
    doc = document(run)
    by_path = {t["path"]: t for t in doc["tests"]}
    want = {"memhp.injected_faults.f1_guest_panic": "FAIL",          # CRASH
            "memhp.injected_faults.f2_guest_stops_responding": "ERROR",  # HANG
            "memhp.injected_faults.f3_qemu_sigkilled": "ERROR",      # INFRA
            "memhp.injected_faults.f4_qmp_connection_dropped": "ERROR",
            "memhp.injected_faults.f5_dropbear_killed": "PASS",
            "memhp.injected_faults.f6_healthy_after_faults": "PASS"}
    assert {p: t["status"] for p, t in by_path.items()} == want
    crash = by_path["memhp.injected_faults.f1_guest_panic"]
    assert crash["log_excerpt"].splitlines()[0].endswith("Kernel panic - not syncing: sysrq triggered crash")
    assert crash["misc"]["outcome"] == "CRASH" and crash["misc"]["splat_kind"] == "panic"
    assert crash["misc"]["measurements"]["guest_panicked_event"] is True
    assert "/tmp/" not in json.dumps(doc) and "/.cache/" not in json.dumps(doc)
    env = crash["environment"]["misc"]
    assert (env["qemu_version"], env["machine"], env["memory"]) == ("7.2.22", "pc", "1024M,slots=4,maxmem=8192M")
    assert set(STATUS) == {"pass", "fail", "crash", "hang", "infra", "skip"}


def test_failed_checks_and_skip(tmp_path):
    run = load_run(derived_failed_run(tmp_path))
    doc = document(run)
    by_path = {t["path"]: t for t in doc["tests"]}
    fail = by_path["memhp.dimm_lifecycle.block_sized_dimm_lifecycle"]
    assert fail["status"] == "FAIL"
    assert "Movable managed delta: expected 32256, observed 32768" in fail["log_excerpt"]
    assert [c["name"] for c in fail["misc"]["failed_checks"]] == ["Movable managed delta", "MemTotal delta (kB)"]
    assert by_path["memhp.param.readback_force"]["status"] == "SKIP"
    on = by_path["memhp.hot_add.hot_add_on-1GiB"]
    assert on["misc"]["measurements"]["memmap_cost"][0]["self_hosted_pages"] == 4096
    assert all(p.startswith("memhp.") and p.count(".") == 2 for p in by_path)


def test_tree_commit_and_patchset(tmp_path):
    run = load_run(LIFECYCLE)
    k = replace(run.kernel, tree="https://git.kernel.org/pub/scm/linux/kernel/git/torvalds/linux.git",
                commit="0123456789abcdef0123456789abcdef01234567", patches=("0001-mm-x.patch",),
                patchset_hash="a" * 64, build_seconds=812.5, base="tinyconfig",
                fragments=("kconfigs/memhp.config",))
    doc = document(replace(run, kernel=k))
    _validate(doc)
    c, b = doc["checkouts"][0], doc["builds"][0]
    assert c["git_repository_url"].startswith("https://") and c["git_commit_hash"] == k.commit
    assert c["patchset_hash"] == "a" * 64
    assert b["duration"] == 812.5 and b["config_name"] == "tinyconfig+memhp.config"
    # A local tree is no URL: it goes to misc, scrubbed, and the document stays valid.
    doc = document(replace(run, kernel=replace(k, tree="/root/linux", patchset_hash="")))
    _validate(doc)
    assert "git_repository_url" not in doc["checkouts"][0]
    assert doc["checkouts"][0]["misc"]["patchset_hash_unknown"] is True


def test_path_parts_and_long_excerpts(tmp_path):
    run = load_run(FAULTS)
    s = replace(run.scenarios[0], case="odd name[with spaces/and.dots]", message="x" * 40000, splat=None,
                outcome="fail")
    assert kcidb_path(s) == "memhp.injected_faults.odd_name_with_spaces_and_dots"
    doc = document(replace(run, scenarios=(s,)))
    _validate(doc)
    assert len(doc["tests"][0]["log_excerpt"]) <= 16384
    assert drop_nulls({"a": None, "b": [1, None], "c": {"d": None}}) == {"b": [1], "c": {}}


def test_real_fail():
    doc = document(load_run(LEAK_FAIL))
    _validate(doc)
    (t,) = doc["tests"]
    assert (t["path"], t["status"], t["misc"]["outcome"]) == ("memhp.leak.leak_add_remove_cycles", "FAIL", "FAIL")
    assert t["log_excerpt"].startswith("free memory given back by the removals, mean over the cycles (kB): "
                                       "expected '[-60, 68]', observed -151.4\n  rule: ")
    recorded = json.loads((LEAK_FAIL / "report.json").read_text())["results"][0]["measurements"]
    assert t["misc"]["measurements"] == recorded       # every measurement, unchanged
