"""The run matrix's pure parts (issue 14): shards, baseline comparison, shard merge, several-kernel
reports and their renderings, progress arithmetic. The several-kernel run folder is a real run
(tests/data/reports/matrix-6.1-6.12); shard and baseline inputs are built here from it, in code."""
from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness.errors import UsageError
from harness.reports import load_run, load_runs, render
from harness.reports import baseline as B
from harness.reports.matrixtable import kernel_table, memmap_cost_columns
from harness.reports.merge import MergeError, merge
from harness.reports.rundir import RunDirError, kernel_docs
from harness.workflows import matrix
from harness.workflows.matrix import Item, Shard, assign, parse_shard, plan_shard
from harness.workflows.progress import Progress, eta, fmt_seconds

from reports_helpers import LIFECYCLE, REPORTS, SUITE
from test_reports_ktap import kunit_parser  # noqa: F401  (the fixture: the kernel's own KTAP parser)

MATRIX = REPORTS / "matrix-6.1-6.12"


def _suite_items():
    doc = json.loads((SUITE / "report.json").read_text())
    return [Item(f"test_{r['name'].split('::')[0]}.py::{r['name']}", r["name"], r["name"].split("::")[0])
            for r in doc["results"]], {r["name"]: r["duration"] for r in doc["results"]}


# ---------------------------------------------------------------- shards
@pytest.mark.parametrize("text,want", [("1/1", Shard(1, 1)), ("2/4", Shard(2, 4)), (" 3 / 3 ", Shard(3, 3))])
def test_parse_shard(text, want):
    assert parse_shard(text) == want


@pytest.mark.parametrize("text", ["0/2", "3/2", "1/0", "1", "a/b", "1/2/3", "", "-1/2", "1/1001"])
def test_parse_shard_refuses(text):
    with pytest.raises(UsageError):
        parse_shard(text)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 45])
@pytest.mark.parametrize("timed", [False, True])
def test_shards_partition_the_selection(n, timed):
    items, durations = _suite_items()
    parts = assign(items, n, durations if timed else None)
    assert len(parts) == n
    flat = [i for p in parts for i in p]
    assert sorted(i.nodeid for i in flat) == sorted(i.nodeid for i in items)      # each once, none lost
    for p in parts:     # collection order kept inside a shard
        assert [i.nodeid for i in p] == [i.nodeid for i in items if i in p]
    # deterministic: the same membership whatever order the scenarios were collected in
    again = assign(list(reversed(items)), n, durations if timed else None)
    assert [sorted(i.nodeid for i in p) for p in again] == [sorted(i.nodeid for i in p) for p in parts]


def test_shards_by_module_keep_modules_whole_and_balance_counts():
    items, _ = _suite_items()
    parts = assign(items, 3)
    mods = [{i.module for i in p} for p in parts]
    assert all(not (a & b) for k, a in enumerate(mods) for b in mods[k + 1:]), mods
    sizes = {}
    for i in items:
        sizes[i.module] = sizes.get(i.module, 0) + 1
    loads = [len(p) for p in parts]
    # greedy longest-first: no shard exceeds another by more than the largest module
    assert max(loads) - min(loads) <= max(sizes.values()), (loads, sizes)


def test_shards_by_duration_balance_seconds():
    items, durations = _suite_items()
    for n in (2, 3, 4):
        loads = [sum(durations[i.name] for i in p) for p in assign(items, n, durations)]
        assert max(loads) - min(loads) <= max(durations.values()), (n, loads)


def test_unrecorded_scenario_weighs_the_median():
    items = [Item(f"t.py::{c}", f"m::{c}", "m") for c in "abcd"]
    parts = assign(items, 2, {"m::a": 100.0, "m::b": 1.0, "m::c": 1.0})    # m::d unknown -> median 1.0
    assert [i.name for i in parts[0]] == ["m::a"] and [i.name for i in parts[1]] == ["m::b", "m::c", "m::d"]


def test_plan_without_shard_is_the_selection():
    items, _ = _suite_items()
    assert plan_shard(items, None) == items


def test_durations_are_the_mean_over_kernels():
    doc = json.loads((MATRIX / "report.json").read_text())
    d = matrix.durations_of(doc)
    name = "rejects::rejects_bad_slot"
    per = [r["duration"] for k in doc["kernels"] for r in k["results"] if r["name"] == name]
    assert len(per) == 2 and d[name] == pytest.approx(sum(per) / 2)


# ---------------------------------------------------------------- baseline
def _kdoc(spec, outcomes):
    return {"kernel": {"spec": spec, "release": "x"},
            "results": [{"name": n, "outcome": o, "message": f"{n} {o}"} for n, o in outcomes.items()]}


def test_baseline_statuses():
    old = _kdoc("debian:6.1", {"a": "pass", "b": "fail", "c": "pass", "d": "crash", "e": "pass", "f": "skip",
                               "g": "infra", "gone": "pass", "h": "pass"})
    new = _kdoc("debian:6.1", {"a": "fail", "b": "pass", "c": "pass", "d": "hang", "e": "infra", "f": "fail",
                               "g": "pass", "new1": "pass", "new2": "crash", "h": "skip"})
    got = {c.name: c.status for c in B.compare([old], [new])}
    assert got == {"a": B.NEW_FAILURE, "b": B.FIXED, "c": B.STILL_PASSING, "d": B.STILL_FAILING,
                   "e": B.NOT_JUDGED, "f": B.NEW_FAILURE, "g": B.STILL_PASSING, "new1": B.NEW_SCENARIO,
                   "new2": B.NEW_SCENARIO, "gone": B.REMOVED, "h": B.NOT_JUDGED}
    changes = B.compare([old], [new])
    assert [c.status for c in changes][:2] == [B.NEW_FAILURE, B.NEW_FAILURE]      # new failures first
    assert {c.name for c in changes if c.is_new_failure} == {"a", "f", "new2"}
    text = B.render(changes, "old/report.json")
    lines = text.splitlines()
    assert lines[0].startswith("compared with the baseline old/report.json: 2 new failure, 1 fixed")
    assert lines[1].split()[:2] == ["NEW", "FAILURE"] and "PASS -> FAIL" in lines[1]
    assert not any(" c " in ln for ln in lines[1:])        # still passing: counted, not listed


def test_baseline_leaves_out_what_this_run_did_not_select():
    old = _kdoc("k", {"a": "pass", "b": "fail", "gone": "pass"})
    new = _kdoc("k", {"a": "pass"})
    got = {c.name: c.status for c in B.compare([old], [new], universe={"a", "b"})}
    assert got == {"a": B.STILL_PASSING, "gone": B.REMOVED}       # b: another shard or -k, not removed


def test_baseline_pairs_kernels_by_spec():
    old = [_kdoc("debian:6.1", {"a": "pass"}), _kdoc("debian:6.12", {"a": "fail"})]
    new = [_kdoc("debian:6.12", {"a": "pass"}), _kdoc("debian:6.1", {"a": "fail"}), _kdoc("x", {"a": "pass"})]
    got = {(c.kernel, c.name): c.status for c in B.compare(old, new)}
    assert got == {("debian:6.1", "a"): B.NEW_FAILURE, ("debian:6.12", "a"): B.FIXED, ("x", "a"): B.NEW_SCENARIO}


def _krun(spec, outcomes):
    from harness.reports.report import Result
    return matrix.KernelRun(spec, {"spec": spec, "release": "r"},
                            tuple(Result(name=n, outcome=o) for n, o in outcomes.items()), Path("/nonexistent"))


@pytest.mark.parametrize("old,new,any_,new_only", [
    ({"a": "fail"}, {"a": "fail"}, 1, 0),           # known failure: --fail-on new passes
    ({"a": "pass"}, {"a": "fail"}, 1, 1),
    ({"a": "pass"}, {"a": "infra"}, 3, 3),          # infrastructure is never hidden
    ({"a": "fail"}, {"a": "pass"}, 0, 0),
    ({}, {"a": "crash"}, 1, 1),                     # a new scenario that fails is not a known failure
])
def test_exit_status_fail_on(old, new, any_, new_only):
    runs = [_krun("k", new)]
    changes = matrix.compare(runs, _kdoc("k", old))
    assert matrix.exit_status(runs, changes, "any") == any_
    assert matrix.exit_status(runs, changes, "new") == new_only


def test_exit_status_is_the_worst_over_kernels():
    assert matrix.exit_status([_krun("a", {"x": "pass"}), _krun("b", {"x": "hang"})]) == 1
    assert matrix.exit_status([_krun("a", {"x": "infra"}), _krun("b", {"x": "pass"})]) == 3
    assert matrix.exit_status([_krun("a", {"x": "infra"}), _krun("b", {"x": "fail"})]) == 1
    assert matrix.exit_status([_krun("a", {})], empty_ok=True) == 0
    assert matrix.exit_status([_krun("a", {})]) == 3


# ---------------------------------------------------------------- merge
def _shards(doc, n, durations=None):
    """Cut a real single-kernel document into n shard documents as `memhp run --shard i/n` writes them."""
    items = [Item(f"t::{r['name']}", r["name"], r["name"].split("::")[0]) for r in doc["results"]]
    out = []
    for i, part in enumerate(assign(items, n, durations), 1):
        names = {x.name for x in part}
        d = copy.deepcopy(doc)
        d["results"] = [r for r in d["results"] if r["name"] in names]
        d["shard"] = {"index": i, "count": n, "selection": [x.name for x in items]}
        out.append((f"shard{i}.json", d))
    return out


def _pairs(doc):
    return sorted((r["name"], r["outcome"]) for r in doc["results"])


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_merge_of_shards_is_the_unsharded_run(n):
    doc = json.loads((SUITE / "report.json").read_text())
    merged = merge(_shards(doc, n))
    assert _pairs(merged) == _pairs(doc)
    assert [r["name"] for r in merged["results"]] == [r["name"] for r in doc["results"]]   # selection order
    assert merged["summary"] == doc["summary"] and merged["exit_status"] == doc["exit_status"]
    assert "shard" not in merged


def test_merge_refuses_overlaps_and_gaps():
    doc = json.loads((SUITE / "report.json").read_text())
    parts = _shards(doc, 3)
    with pytest.raises(MergeError, match=r"shard 2/3 missing: a gap"):
        merge([parts[0], parts[2]])
    with pytest.raises(MergeError, match=r"shard 1/3 given twice .*overlap"):
        merge(parts + [("again.json", parts[0][1])])
    lost = copy.deepcopy(parts)
    gone = lost[1][1]["results"].pop()["name"]
    with pytest.raises(MergeError, match=rf"no result for {gone}.* a gap"):
        merge(lost)
    twice = copy.deepcopy(parts)
    twice[0][1]["results"].append(copy.deepcopy(parts[1][1]["results"][0]))
    with pytest.raises(MergeError, match=r"is in shard1.json and in shard2.json: overlap"):
        merge(twice)
    mixed = copy.deepcopy(parts)
    mixed[2][1]["shard"]["count"] = 4
    with pytest.raises(MergeError, match="different counts"):
        merge(mixed)
    other = copy.deepcopy(parts)
    other[1][1]["shard"]["selection"] = other[1][1]["shard"]["selection"][:-1]
    with pytest.raises(MergeError, match="different selections"):
        merge(other)
    with pytest.raises(MergeError, match="not a shard.*overlap"):
        merge([("a.json", doc), ("b.json", doc)])


def test_merge_of_kernels_side_by_side_loads_as_several_kernels(tmp_path):
    top = json.loads((MATRIX / "report.json").read_text())
    a, b = (copy.deepcopy(k) for k in top["kernels"])
    shards = [(f"{k['kernel']['spec']}-{i}", d) for k in (a, b) for i, (_, d) in enumerate(_shards(k, 2), 1)]
    merged = merge(shards)
    assert [k["kernel"]["spec"] for k in merged["kernels"]] == ["debian:6.1", "debian:6.12"]
    assert [_pairs(k) for k in merged["kernels"]] == [_pairs(a), _pairs(b)]
    assert merged["exit_status"] == top["exit_status"] == 0 and merged["summary"] == top["summary"]
    (tmp_path / "report.json").write_text(json.dumps(merged))
    runs = load_runs(tmp_path)
    assert [r.kernel.spec for r in runs.runs] == ["debian:6.1", "debian:6.12"]


# ---------------------------------------------------------------- several kernels: load and render
def test_single_kernel_runs_still_load():
    assert load_run(LIFECYCLE).kernel.spec == "debian:6.12"
    rs = load_runs(LIFECYCLE)
    assert len(rs.runs) == 1 and not rs.multi


def test_several_kernel_run_loads_each_kernel_from_its_folder():
    rs = load_runs(MATRIX)
    assert rs.multi and [r.kernel.spec for r in rs.runs] == ["debian:6.1", "debian:6.12"]
    assert rs.runs[0].kernel.release.startswith("6.1.") and rs.runs[1].kernel.release.startswith("6.12.")
    for r in rs.runs:
        assert r.path == MATRIX / r.kernel.spec.replace(":", "_")
        assert all(s.artifacts is not None and s.console for s in r.scenarios), r.kernel.spec
        # the shared guest's boot console (in that kernel's folder) names the kernel that ran
        assert any(f"Linux version {r.kernel.release} " in f.read_text() for f in r.path.glob("shared-*/console.log"))
    with pytest.raises(RunDirError, match="holds 2 kernels"):
        load_run(MATRIX)
    assert load_run(MATRIX / "debian_6.1").kernel.spec == "debian:6.1"        # each folder alone


def test_several_kernel_junit_has_a_suite_per_kernel():
    root = ET.fromstring(render(load_runs(MATRIX), "junit"))
    assert root.tag == "testsuites"
    assert [s.get("name") for s in root] == ["memhp.debian:6.1", "memhp.debian:6.12"]
    assert all(int(s.get("tests")) == 2 == len(list(s.iter("testcase"))) for s in root)
    one = ET.fromstring(render(load_runs(LIFECYCLE), "junit"))
    assert one.tag == "testsuite" and one.get("name") == "memhp.debian:6.12"


def test_several_kernel_kcidb_is_valid_and_holds_every_kernel():
    from harness.reports.kcidb import validate
    text = render(load_runs(MATRIX), "kcidb")
    assert validate(text) is None
    doc = json.loads(text)
    assert len(doc["checkouts"]) == len(doc["builds"]) == 2 and len(doc["tests"]) == 4
    assert {t["build_id"] for t in doc["tests"]} == {b["id"] for b in doc["builds"]}
    assert len({t["id"] for t in doc["tests"]}) == 4


def test_several_kernel_ktap_parses(kunit_parser):
    text = render(load_runs(MATRIX), "ktap")
    top = kunit_parser.parse_run_tests(text.splitlines())
    assert top.counts.errors == 0, text
    assert (top.counts.passed, top.counts.failed) == (4, 0)
    assert [t.name for t in top.subtests] == ["debian:6.1", "debian:6.12"]
    assert [[m.name for m in t.subtests] for t in top.subtests] == [["dimm_lifecycle", "rejects"]] * 2


def test_several_kernel_html_is_refused_with_the_folders_to_use():
    with pytest.raises(ValueError, match="debian_6.1, debian_6.12"):
        render(load_runs(MATRIX), "html")
    assert "<html" in render(load_runs(MATRIX / "debian_6.12"), "html").lower()


def test_kernel_table_and_markdown():
    rs = load_runs(MATRIX)
    cols = [(r.kernel.spec, r.scenarios) for r in rs.runs]
    text = kernel_table(cols)
    lines = text.splitlines()
    assert lines[0].split() == ["SCENARIO", "debian:6.1", "debian:6.12"]
    assert lines[1].split() == ["dimm_lifecycle::block_sized_dimm_lifecycle", "PASS", "PASS"]
    # a scenario one kernel did not run shows "-", a failure gets a detail line
    from dataclasses import replace
    bad = replace(rs.runs[1].scenarios[0], outcome="fail", message="present: expected 1, observed 2")
    text = kernel_table([cols[0], ("debian:6.12", (bad,))])
    assert "rejects::rejects_bad_slot                   PASS        -" in text
    assert "FAIL  debian:6.12 dimm_lifecycle::block_sized_dimm_lifecycle: present: expected 1, observed 2" in text
    md = render(rs, "markdown")
    assert "| scenario | `debian:6.1` | `debian:6.12` |" in md
    assert "| dimm\\_lifecycle::block\\_sized\\_dimm\\_lifecycle | PASS | PASS |" in md


def test_memmap_cost_has_a_column_per_kernel():
    suite = load_run(SUITE)
    cols = [("debian:6.12", suite.scenarios), ("other", ())]
    text = memmap_cost_columns(cols)
    rows = [r for s in suite.scenarios for r in s.measurements.get("memmap_cost", [])]
    assert rows and len(text.splitlines()) == 2 + len({(r["dimm_mib"], r["param"]) for r in rows})
    first = sorted(rows, key=lambda r: (r["dimm_mib"], r["param"]))[0]
    assert f"{first['memfree_drop_kb']}/{first['expected_kb']} kB, {first['self_hosted_pages']} p" in text
    assert text.splitlines()[2].rstrip().endswith("-")
    assert memmap_cost_columns([("a", ()), ("b", ())]) == ""


def test_report_json_of_one_kernel_keeps_the_old_form_and_several_get_a_list():
    one = matrix.report_json([_krun("debian:6.12", {"a": "pass"})], None)
    assert set(one) == {"kernel", "results", "summary", "exit_status"}
    two = matrix.report_json([_krun("debian:6.1", {"a": "pass"}), _krun("debian:6.12", {"a": "fail"})],
                             {"index": 1, "count": 2, "selection": ["a"]})
    assert [k["dir"] for k in two["kernels"]] == ["debian_6.1", "debian_6.12"]
    assert two["exit_status"] == 1 and two["summary"]["fail"] == 1 and two["shard"]["count"] == 2
    assert [d["kernel"]["spec"] for d in kernel_docs(two)] == ["debian:6.1", "debian:6.12"]
    assert matrix.kernel_dirs(["debian:6.1", "/a/b/", "debian:6.1"]) == ["debian_6.1", "a_b", "debian_6.1-3"]


# ---------------------------------------------------------------- progress
def test_eta_and_format():
    assert eta(["a", "b"], {"a": 10.0, "b": 20.0}, [], jobs=1, running_for=5) == 25
    assert eta(["a", "b"], {"a": 10.0, "b": 20.0}, [], jobs=2) == 15
    assert eta(["a", "c"], {"a": 10.0}, [4.0, 6.0]) == 15          # c never recorded: this run's mean
    assert eta(["c"], {}, []) is None
    assert [fmt_seconds(x) for x in (0, 59.4, 61, 3600 + 120)] == ["0s", "59s", "1m01s", "1h02m"]


def test_progress_line_counts_every_kernel(tmp_path):
    import io
    s = io.StringIO()
    p = Progress(["debian:6.1", "debian:6.12"], 2, {"m::a": 10.0, "m::b": 30.0}, s)
    p.map_nodeids({"t.py::a": "m::a", "t.py::b": "m::b"})
    p.start_kernel("debian:6.1", ["m::a", "m::b"])
    try:
        assert p.line(now=0).startswith("[debian:6.1] 0/4 done, 4 left, ETA 1m20s")

        class Rep:
            def __init__(self, when, nodeid="t.py::a", sections=()):
                self.when, self.nodeid, self.duration, self.sections, self.skipped = when, nodeid, 4.0, sections, False
        p.pytest_runtest_logstart("t.py::a", None)
        for when in ("setup", "call"):
            p.pytest_runtest_logreport(Rep(when, sections=[("memhp outcome", "FAIL")] if when == "call" else []))
        p.pytest_runtest_logreport(Rep("teardown"))
        assert p.line().startswith("[debian:6.1] 1/4 done, 3 left, ETA 1m10s")    # b 30 + next kernel 40
        assert "  FAIL   [debian:6.1] m::a (12.0s)\n" in s.getvalue()
    finally:
        p.close()
    assert s.getvalue().endswith("\r\x1b[K")        # the live line is cleared when done


# ---------------------------------------------------------------- bad input, before anything is collected or booted
@pytest.mark.parametrize("argv,words", [
    (["run", "--shard", "3/2"], "--shard 3/2: I must be 1..N"),
    (["run", "--shard", "half"], "--shard 'half': give I/N"),
    (["run", "--fail-on", "new"], "--fail-on new needs --baseline"),
    (["run", "--baseline", "{tmp}/missing.json"], "--baseline: "),
    (["run", "--durations-from", "{tmp}/bad.json"], "not JSON"),
    (["run", "--kernel", "debian:6.1", "--kernel", "debian:6.1"], "--kernel 'debian:6.1' given twice"),
    (["run", "--kernel", "debian:6.1", "--kernel", "debian:6.12", "--html", "{tmp}/r.html"], "--html is one page per kernel"),
    (["run", "--kernel", "debian-src:6.1", "--kernel", "debian:6.12", "--patch", "{tmp}/bad.json"], "--patch applies only to debian-src"),
    (["report"], "memhp report RUN_DIR --format FORMAT, or memhp report --merge"),
    (["report", "{tmp}", "--merge", "{tmp}/bad.json"], "give either RUN_DIR"),
    (["report", "--merge", "{tmp}/missing.json"], "--merge: "),
    (["report", "--merge", "{tmp}/bad.json", "--format", "ktap"], "report --merge writes JSON"),
    (["report", "{tmp}", "--format", "ktap", "--vmlinux", "{tmp}/bad.json"], "--vmlinux decodes the splats of"),
    (["report", "{tmp}", "--format", "json", "--fetch-vmlinux"], "--fetch-vmlinux decodes the splats of"),
])
def test_matrix_bad_input(argv, words, tmp_path, capsys, monkeypatch):
    from harness import cli
    monkeypatch.setattr(cli, "_collect", lambda *a: pytest.fail("collected scenarios despite bad input"))
    (tmp_path / "bad.json").write_text("{not json")
    assert cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err


def test_report_merge_through_the_cli(tmp_path, capsys):
    from harness import cli
    doc = json.loads((SUITE / "report.json").read_text())
    files = []
    for name, d in _shards(doc, 2):
        files.append(tmp_path / name)
        files[-1].write_text(json.dumps(d))
    assert cli.main(["report", "--merge", *map(str, files), "-o", str(tmp_path / "m.json")]) == 0
    assert _pairs(json.loads((tmp_path / "m.json").read_text())) == _pairs(doc)
    assert cli.main(["report", "--merge", str(files[0])]) == 2
    assert "shard 2/2 missing: a gap" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "m.json"), "--format", "markdown"]) == 0
    assert "| scenario | `debian:6.12` |" in capsys.readouterr().out
