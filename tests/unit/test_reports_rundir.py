"""Loading a finished run's folder into RunData, and the pure helpers behind it."""
from __future__ import annotations

import json
import shutil

import pytest

from harness.reports import FORMATS, load_run, render
from harness.reports.memmap import block_zone
from harness.reports.rundir import (RunDirError, compiler_of, parse_argv, parse_checks, parse_config,
                                    qemu_greeting, scrub_paths)

from reports_helpers import FAULTS, LIFECYCLE, derived_failed_run, failure_message


def test_fault_run():
    run = load_run(FAULTS)
    assert [s.outcome for s in run.scenarios] == ["crash", "hang", "infra", "infra", "pass", "pass"]
    assert [s.module for s in run.scenarios] == ["injected_faults"] * 6
    crash = run.scenarios[0]
    assert crash.splat.kind == "panic" and crash.splat.line >= 0
    assert crash.console.splitlines()[crash.splat.line].endswith("Kernel panic - not syncing: sysrq triggered crash")
    assert crash.artifacts == FAULTS / "test_injected_faults.py_test_f1_guest_panic"
    assert run.failed == run.scenarios[:2] and run.count("infra") == 2
    assert run.exit_status == 1
    m = run.machine
    assert (m.qemu_version, m.machine, m.accel, m.memory, m.smp) == \
        ("7.2.22", "pc", "tcg,thread=single", "1024M,slots=4,maxmem=8192M", "2")
    assert "/root/" not in m.argv and "-kernel vmlinuz-6.12.117+deb12-cloud-amd64" in m.argv.replace("'", "")
    k = run.kernel
    assert (k.release, k.spec, k.config_source) == ("6.12.117+deb12-cloud-amd64", "debian:6.12", "kernel.config")
    assert k.symbol("MEMCG") == "y" and k.symbol("DEBUG_VM") == "n" and k.symbol("CONFIG_HUGETLB_PAGE") == "y"
    assert k.compiler == "x86_64-linux-gnu-gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0"


def test_shared_guest_run_finds_greeting_and_facts():
    """A shared guest's scenario folder holds a slice of QMP without the greeting; the loader
    looks in the guest's own folder."""
    scen = LIFECYCLE / "test_dimm_lifecycle.py_test_block_sized_dimm_lifecycle"
    assert qemu_greeting((scen / "qmp.jsonl").read_text()) == ("", "")
    run = load_run(LIFECYCLE)
    assert run.machine.qemu_version == "7.2.22"
    assert run.facts["struct_page"] == 64 and run.facts["block_size"] == 128 << 20


def test_moved_run_folder(tmp_path):
    """report.json names artifacts by absolute path; a copied folder still finds them by name."""
    dst = tmp_path / "copied"
    shutil.copytree(FAULTS, dst)
    doc = json.loads((dst / "report.json").read_text())
    for r in doc["results"]:
        r["artifacts"] = "/nonexistent/old/place/" + r["artifacts"]
    (dst / "report.json").write_text(json.dumps(doc))
    run = load_run(dst / "report.json")
    assert all(s.artifacts and s.artifacts.parent == dst for s in run.scenarios)
    assert run.scenarios[0].splat is not None


def test_not_a_run(tmp_path):
    with pytest.raises(RunDirError, match="cannot read"):
        load_run(tmp_path)
    (tmp_path / "report.json").write_text("{")
    with pytest.raises(RunDirError, match="not JSON"):
        load_run(tmp_path)
    (tmp_path / "report.json").write_text('{"kernel": {}}')
    with pytest.raises(RunDirError, match="no results"):
        load_run(tmp_path)


def test_parse_checks_multi_and_single():
    checks = parse_checks(failure_message())
    assert [(c.name, c.expected, c.observed) for c in checks] == [
        ("Movable managed delta", "32256", "32768"), ("MemTotal delta (kB)", "129024", "131072")]
    assert checks[0].rule.endswith("hosts its own 512-page (2 MiB) vmemmap")
    assert checks[1].rule == "MemTotal grows by the managed pages in kB"
    one = parse_checks("CheckFailed: memory40/state: expected 'offline', observed 'online' (memhp_default_state=offline "
                       "leaves new blocks offline)")
    assert [(c.name, c.expected, c.observed, c.rule) for c in one] == [
        ("memory40/state", "'offline'", "'online'", "memhp_default_state=offline leaves new blocks offline")]
    assert parse_checks("AssertionError: something else") == ()
    assert parse_checks("") == ()


def test_recorded_checks_win(tmp_path):
    run_dir = derived_failed_run(tmp_path)
    doc = json.loads((run_dir / "report.json").read_text())
    doc["results"][0]["measurements"]["failed_checks"] = [
        {"name": "Movable spanned delta", "expected": 32768, "observed": 0, "rule": "spanned += block_pages"}]
    (run_dir / "report.json").write_text(json.dumps(doc))
    s = load_run(run_dir).scenarios[0]
    assert [(c.name, c.expected, c.observed) for c in s.checks] == [("Movable spanned delta", "32768", "0")]


def test_pure_helpers():
    assert parse_config("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x y\"\n") == \
        {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "x y"}
    av = parse_argv("qemu-system-x86_64 -M pc -enable-kvm -m 2G -append 'a b'")
    assert (av["machine"], av["accel"], av["memory"], av["cmdline"]) == ("pc", "kvm", "2G", "a b")
    assert compiler_of("[    0.000000] Linux version 6.1.0 (x@y) (gcc (Debian 12.2.0-14) 12.2.0, GNU ld 2.40) #1") \
        == "gcc (Debian 12.2.0-14) 12.2.0"
    assert scrub_paths("see /root/.cache/memhp/artifacts/run-1/x/console.log and /usr/bin/qemu") == \
        "see console.log and /usr/bin/qemu"
    assert scrub_paths("path=/tmp/memhp-x/qmp.sock,server=on") == "path=qmp.sock,server=on"
    assert block_zone("online", ("none",)) == "mixed" and block_zone("offline", ("Normal", "Movable")) is None
    assert block_zone("online", ("Movable",)) == "Movable"


def test_render_every_format(tmp_path):
    run = load_run(derived_failed_run(tmp_path))
    for fmt in FORMATS:
        out = render(run, fmt)
        assert isinstance(out, str) and out.strip()
    assert json.loads(render(run, "json"))["exit_status"] == 1
    with pytest.raises(ValueError, match="unknown report format"):
        render(run, "pdf")


def test_patchset_hash_matches_kcidb_recipe(tmp_path):
    """KCIDB's own recipe: sha256sum *.patch | cut -c-64 | sha256sum | cut -c-64."""
    import subprocess
    from harness.reports.kcidb import document
    from harness.reports.rundir import patchset_hash
    from reports_helpers import DATA
    patch = DATA / "patches" / "0001-memhp-pr_info-on-add.patch"
    two = tmp_path / "0002-second.patch"
    two.write_text("--- a/x\n+++ b/x\n")
    want = subprocess.run(f"sha256sum {patch} {two} | cut -c-64 | sha256sum | cut -c-64", shell=True,
                          capture_output=True, text=True, check=True).stdout.strip()
    assert patchset_hash([patch.read_bytes(), two.read_bytes()]) == want
    assert patchset_hash([]) == ""
    run_dir = tmp_path / "run"
    shutil.copytree(LIFECYCLE, run_dir)
    doc = json.loads((run_dir / "report.json").read_text())
    doc["kernel"]["patches"] = [str(patch), str(two)]
    (run_dir / "report.json").write_text(json.dumps(doc))
    run = load_run(run_dir)
    assert run.kernel.patchset_hash == want
    assert document(run)["checkouts"][0]["patchset_hash"] == want
    two.unlink()                              # a patch no longer readable: no hash rather than a wrong one
    assert load_run(run_dir).kernel.patchset_hash == ""
