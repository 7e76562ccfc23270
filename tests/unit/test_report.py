"""harness.report: outcome classification, exit status, table, memmap-cost table, JSON, JUnit. Pure."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from harness import report
from harness.errors import (CheckFailed, GuestCommandError, GuestCrash, Hang, HostToolMissing, InfraError,
                            KVMBroken, QMPCommandError, QMPError, UsageError, VMLaunchFailure)
from harness.report import Result


@pytest.mark.parametrize("exc,outcome", [
    (None, report.PASS),
    (GuestCrash("warning", "WARNING: CPU: 0 PID: 1 at mm/memory_hotplug.c:1"), report.CRASH),
    (Hang("QMP event DEVICE_DELETED", timeout=30), report.HANG),
    (CheckFailed("Movable managed delta", 32256, 32768, "rule"), report.FAIL),
    (AssertionError("x"), report.FAIL),
    (GuestCommandError("echo online > state", 1, "", "Invalid argument"), report.FAIL),
    (QMPCommandError("device_add", "GenericError", "no free slots available"), report.FAIL),
    (InfraError("host"), report.INFRA),
    (VMLaunchFailure("QEMU exited", ["qemu"], 1, "boom"), report.INFRA),
    (KVMBroken("no output"), report.INFRA),
    (QMPError("closed"), report.INFRA),
    (HostToolMissing("qemu-system-x86_64 not found"), report.INFRA),
    (OSError(28, "No space left on device"), report.INFRA),
    (ValueError("unexpected"), report.FAIL),
])
def test_classify(exc, outcome):
    assert report.classify(exc) == outcome


def R(name, outcome, **kw):
    return Result(name=name, outcome=outcome, **kw)


@pytest.mark.parametrize("outcomes,status", [
    ([report.PASS], report.EXIT_OK),
    ([report.PASS, report.SKIP], report.EXIT_OK),
    ([report.PASS, report.FAIL], report.EXIT_KERNEL),
    ([report.CRASH], report.EXIT_KERNEL),
    ([report.HANG, report.INFRA], report.EXIT_KERNEL),   # the kernel's failure wins over infra
    ([report.INFRA, report.PASS], report.EXIT_INFRA),
    ([], report.EXIT_INFRA),                               # nothing ran: never a silent pass
])
def test_exit_status(outcomes, status):
    assert report.exit_status([R(f"s{i}", o) for i, o in enumerate(outcomes)]) == status


def test_exit_codes_are_distinct_and_documented():
    assert (report.EXIT_OK, report.EXIT_KERNEL, report.EXIT_USAGE, report.EXIT_INFRA) == (0, 1, 2, 3)


def test_summary_line_counts_every_outcome():
    rs = [R("a", report.PASS), R("b", report.PASS), R("c", report.CRASH), R("d", report.SKIP)]
    line = report.summary_line(rs)
    assert line == "memhp: 2 pass, 0 fail, 1 crash, 0 hang, 0 infra, 1 skip (4 scenarios)"


def test_table_has_one_row_per_result_and_flattens_messages():
    rs = [R("dimm_lifecycle::block_sized_dimm_lifecycle", report.PASS, duration=12.34),
          R("x::y", report.FAIL, message="managed:\n expected 1\n observed 2")]
    lines = report.table(rs).splitlines()
    assert len(lines) == 3 and lines[0].split()[:3] == ["SCENARIO", "OUTCOME", "TIME"]
    assert "PASS" in lines[1] and "12.3s" in lines[1]
    assert "FAIL" in lines[2] and "managed: expected 1 observed 2" in lines[2]


def test_table_truncates_long_messages():
    line = report.table([R("n", report.FAIL, message="x" * 1000)], width=100).splitlines()[1]
    assert len(line) <= 100


def _row(mib, param, drop, exp, hosted, applies, reason="r"):
    return {"dimm_mib": mib, "param": param, "memfree_drop_kb": drop, "expected_kb": exp,
            "self_hosted_pages": hosted, "applies": applies, "reason": reason}


def test_memmap_cost_table_sorted_rows_from_all_results():
    rs = [R("a", report.PASS, measurements={"memmap_cost": [_row(1024, "on", 16384, 16384, 0, False, "too big")]}),
          R("b", report.PASS, measurements={"memmap_cost": [_row(128, "on", 0, 0, 512, True),
                                                            _row(128, "off", 4096, 4096, 0, False)]}),
          R("c", report.PASS)]
    lines = report.memmap_cost_table(rs).splitlines()
    assert lines[0].startswith("memmap cost at hot-add") and "DIMM" in lines[1]
    body = lines[2:]
    assert [ln.split()[:2] for ln in body] == [["128M", "off"], ["128M", "on"], ["1024M", "on"]]
    assert "yes: r" in body[1] and "no: too big" in body[2] and "512" in body[1]


def test_memmap_cost_table_empty_without_rows():
    assert report.memmap_cost_table([R("a", report.PASS, measurements={"facts": {}})]) == ""
    assert report.memmap_cost_table([]) == ""


def test_write_json(tmp_path):
    rs = [R("a", report.PASS, duration=1.5, measurements={"facts": {"release": "6.1.0"}}, artifacts="/x"),
          R("b", report.HANG, message="timed out")]
    p = tmp_path / "r.json"
    report.write_json(p, {"release": "6.1.0-56-cloud-amd64", "spec": "debian:6.1"}, rs)
    doc = json.loads(p.read_text())
    assert doc["kernel"] == {"release": "6.1.0-56-cloud-amd64", "spec": "debian:6.1"}
    assert [r["name"] for r in doc["results"]] == ["a", "b"]
    assert set(doc["results"][0]) >= {"name", "outcome", "message", "duration", "measurements", "artifacts"}
    assert doc["summary"]["pass"] == 1 and doc["summary"]["hang"] == 1
    assert doc["exit_status"] == report.EXIT_KERNEL


def test_write_junit(tmp_path):
    rs = [R("ok", report.PASS, duration=1.0, measurements={"decision": "applies"}, artifacts="/a"),
          R("bad", report.FAIL, message="expected 1 observed 2"),
          R("crash", report.CRASH, message="WARNING: x"), R("hang", report.HANG), R("infra", report.INFRA),
          R("skip", report.SKIP, message="why")]
    p = tmp_path / "j.xml"
    report.write_junit(p, "memhp.debian:6.12", rs)
    ts = ET.parse(p).getroot()
    assert ts.tag == "testsuite" and ts.get("name") == "memhp.debian:6.12"
    assert (ts.get("tests"), ts.get("failures"), ts.get("errors"), ts.get("skipped")) == ("6", "1", "3", "1")
    cases = {tc.get("name"): tc for tc in ts.iter("testcase")}
    assert list(cases) == ["ok", "bad", "crash", "hang", "infra", "skip"]
    assert cases["bad"].find("failure").text == "expected 1 observed 2"
    assert cases["crash"].find("error").get("type") == report.CRASH
    assert cases["skip"].find("skipped").get("message") == "why"
    props = {p.get("name"): p.get("value") for p in cases["ok"].iter("property")}
    assert props == {"outcome": "pass", "artifacts": "/a", "decision": '"applies"'}


def test_usage_error_is_not_an_outcome_of_a_scenario():
    # A UsageError inside a scenario is the scenario's bug, not the kernel's nor the host's.
    assert report.classify(UsageError("bad")) == report.FAIL
