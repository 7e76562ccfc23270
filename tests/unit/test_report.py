"""harness.reports.report: outcome classification, exit status, table, memmap-cost table, JSON, JUnit. Pure."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from harness.reports import report
from harness.errors import (CheckFailed, GuestCommandError, GuestCrash, GuestRefused, Hang, HostCommandError,
                            HostToolMissing, InfraError, KernelConfigError, KVMBroken, PackageError,
                            QMPCommandError, QMPError, UsageError, VMLaunchFailure)
from harness.reports.report import Result


@pytest.mark.parametrize("exc,outcome", [
    (None, report.PASS),
    (GuestCrash("warning", "WARNING: CPU: 0 PID: 1 at mm/memory_hotplug.c:1"), report.CRASH),
    (Hang("QMP event DEVICE_DELETED", timeout=30), report.HANG),
    (CheckFailed("Movable managed delta", 32256, 32768, "rule"), report.FAIL),
    (AssertionError("x"), report.FAIL),
    (GuestCommandError("echo online > state", 1, "", "Invalid argument"), report.FAIL),
    (GuestRefused("the guest refused dimm0: add_memory failed"), report.FAIL),
    # QEMU, not the kernel, refuses QMP commands: an unexpected refusal is INFRA
    (QMPCommandError("device_add", "GenericError", "no free slots available"), report.INFRA),
    (InfraError("host"), report.INFRA),
    (VMLaunchFailure("QEMU exited", ["qemu"], 1, "boom"), report.INFRA),
    (KVMBroken("no output"), report.INFRA),
    (QMPError("closed"), report.INFRA),
    (HostToolMissing("qemu-system-x86_64 not found"), report.INFRA),
    (HostCommandError("apt-get download failed", ["apt-get"], 100), report.INFRA),
    (PackageError("no candidate"), report.INFRA),
    (OSError(28, "No space left on device"), report.INFRA),
    (OSError(36, "File name too long"), report.INFRA),
    # a bug in memhp is not the kernel's failure
    (ValueError("unexpected"), report.INFRA),
    (KeyError("MemFree"), report.INFRA),
    (TypeError("unsupported operand type(s) for -: 'NoneType' and 'int'"), report.INFRA),
    (UsageError("bad input reaching a scenario"), report.INFRA),
])
def test_classify(exc, outcome):
    assert report.classify(exc) == outcome


def test_classify_pytest_fail_is_a_fail():
    with pytest.raises(BaseException) as ei:
        pytest.fail("the scenario's own check")
    assert report.classify(ei.value) == report.FAIL


@pytest.mark.parametrize("exc,status", [
    (UsageError("x"), report.EXIT_USAGE), (KernelConfigError("no hotplug"), report.EXIT_USAGE),
    (HostToolMissing("x"), report.EXIT_INFRA), (QMPCommandError("a", "b", "c"), report.EXIT_INFRA),
    (HostCommandError("x"), report.EXIT_INFRA), (OSError(36, "File name too long"), report.EXIT_INFRA),
    (KeyError("x"), report.EXIT_INFRA), (CheckFailed("n", 1, 2, "r"), report.EXIT_KERNEL),
    (GuestCrash("panic", "Kernel panic"), report.EXIT_KERNEL), (Hang("x"), report.EXIT_KERNEL),
    (KeyboardInterrupt(), 130),
])
def test_exit_for_error_follows_classify(exc, status):
    assert report.exit_for_error(exc) == status


# ---------------------------------------------------------------- merging a scenario's phases
def _merged(*phases):
    r = Result(name="s", outcome=report.PASS)
    for outcome, msg, when in phases:
        report.merge(r, outcome, msg, when)
    return r


def test_merge_teardown_infra_never_hides_a_fail():
    r = _merged((report.PASS, "", "setup"), (report.FAIL, "managed: expected 1, observed 2", "call"),
                (report.INFRA, "QMPError: socket closed", "teardown"))
    assert r.outcome == report.FAIL
    assert r.message.index("managed: expected 1") < r.message.index("INFRA in teardown: QMPError: socket closed")


def test_merge_worse_kernel_outcome_comes_first_and_keeps_the_other():
    r = _merged((report.FAIL, "check x", "call"), (report.CRASH, "WARNING: at mm/x.c", "teardown"))
    assert r.outcome == report.CRASH
    assert r.message.startswith("WARNING: at mm/x.c") and "also FAIL: check x" in r.message


def test_merge_infra_then_fail_reports_the_fail_first():
    r = _merged((report.INFRA, "setup hiccup", "setup"), (report.FAIL, "check y", "teardown"))
    assert r.outcome == report.FAIL and r.message.startswith("check y") and "also INFRA: setup hiccup" in r.message


def test_merge_skip_and_pass():
    assert _merged((report.SKIP, "no NUMA", "setup")).outcome == report.SKIP
    r = _merged((report.SKIP, "why", "setup"), (report.INFRA, "teardown broke", "teardown"))
    assert (r.outcome, r.message) == (report.INFRA, "teardown broke")
    assert _merged((report.PASS, "", "call")).outcome == report.PASS


def test_makereport_merges_phases_in_a_real_pytest_run(tmp_path):
    """The plugin's pytest_runtest_makereport, in a real inner pytest: a FAIL in the call and an
    INFRA in the teardown give one FAIL result naming both; a bug in a scenario is INFRA."""
    from harness.plugin import RunOptions
    scen = tmp_path / "scen"
    scen.mkdir()
    (scen / "test_m.py").write_text(
        "import pytest\n"
        "from harness.errors import CheckFailed, QMPError\n"
        "@pytest.fixture\n"
        "def broken_teardown():\n"
        "    yield\n"
        "    raise QMPError('monitor socket closed during teardown')\n"
        "def test_fail_then_infra(broken_teardown):\n"
        "    raise CheckFailed('managed', 1, 2, 'rule')\n"
        "def test_memhp_bug():\n"
        "    {}['MemFree']\n"
        "def test_pass_then_infra(broken_teardown):\n"
        "    pass\n")
    res = tmp_path / "results.json"
    rc = pytest.main([str(scen), "-q", "-p", "no:cacheprovider", f"--rootdir={scen}", "-c", "/dev/null"],
                     plugins=[RunOptions(kernel="debian:6.12", results=str(res))])
    assert rc == 1
    got = {r["name"]: r for r in json.loads(res.read_text())}
    f = got["m::fail_then_infra"]
    assert f["outcome"] == report.FAIL
    assert f["message"].index("CheckFailed: managed") < f["message"].index("also INFRA in teardown: QMPError")
    bug = got["m::memhp_bug"]
    assert bug["outcome"] == report.INFRA and "memhp bug: KeyError" in bug["message"] and "test_m.py:" in bug["message"]
    assert got["m::pass_then_infra"]["outcome"] == report.INFRA


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
    # git bisect run: 0 good, 1..127 except 125 bad, 125 skip, >127 abort
    assert report.BISECT_STATUS == {0: 0, 1: 1, 2: 128, 3: 125, 130: 130}


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
    assert lines[0].startswith("memmap cost at hot-add") and "DEVICE" in lines[1]
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


def test_usage_error_in_a_scenario_is_infra():
    # A UsageError inside a scenario is memhp's or the setup's problem, never the kernel's.
    assert report.classify(UsageError("bad")) == report.INFRA
