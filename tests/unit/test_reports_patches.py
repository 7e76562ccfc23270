"""The --patch series in report.json (harness.reports.kernelfacts) and in every report that names it:
KCIDB's checkout (patchset_hash, patchset_files; validated with kcidb-io), the email's and the HTML
page's kernel facts. The patches are memhp's own test patches in tests/data/patches."""
from __future__ import annotations

import base64
import email
import email.policy
import json
import shutil
import subprocess
from pathlib import Path

import kcidb_io

from harness.reports import load_run, render
from harness.reports.kcidb import document
from harness.reports.kernelfacts import kernel_json, patch_subject, patchset_hash_of_digests

from reports_helpers import DATA, derived_failed_run

PATCHES = [DATA / "patches" / "0001-memhp-pr_info-on-add.patch",
           DATA / "patches" / "0002-memhp-plant-present-off-by-one-pageblock.patch"]


def _shell_patchset_hash(paths) -> str:
    """KCIDB's own definition, run as its schema documents it: sha256sum *.patch | cut -c-64 | sha256sum."""
    cmd = "sha256sum " + " ".join(f"'{p}'" for p in paths) + " | cut -c-64 | sha256sum | cut -c-64"
    return subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=True).stdout.strip()


def _run_with_patches(tmp_path: Path, patches=PATCHES) -> Path:
    run = derived_failed_run(tmp_path)
    doc = json.loads((run / "report.json").read_text())
    doc["kernel"] = kernel_json("6.1.0-memhp", "debian-src:6.1", patches, run)
    (run / "report.json").write_text(json.dumps(doc))
    return run


def test_patch_subject_forms():
    mail = "From: a <a@b>\nSubject: [PATCH v2 1/3] mm/memory_hotplug: fix the\n thing\n\nbody\n---\ndiff --git a b\n"
    assert patch_subject(mail) == "mm/memory_hotplug: fix the thing"
    assert patch_subject("From 0123abcd Mon Sep 17 00:00:00 2001\nFrom: x\nSubject: plain one\n\n") == "plain one"
    assert patch_subject("mm: describe it first\n\n--- a/x\n+++ b/x\n") == "mm: describe it first"
    assert patch_subject("--- a/x\n+++ b/x\n@@ -1 +1 @@\n") == ""
    assert patch_subject(PATCHES[1].read_text()).startswith("mm/memory_hotplug: memhp: PLANTED BUG")


def test_kernel_json_records_and_copies_each_patch(tmp_path):
    doc = kernel_json("6.1.0", "debian-src:6.1", PATCHES, tmp_path)
    assert [p["file"] for p in doc["patches"]] == [p.name for p in PATCHES]
    for rec, p in zip(doc["patches"], PATCHES):
        out = subprocess.run(["sha256sum", str(p)], capture_output=True, text=True, check=True).stdout
        assert rec["sha256"] == out.split()[0]
        assert (tmp_path / "patches" / p.name).read_bytes() == p.read_bytes()
    assert doc["patches"][1]["subject"] == patch_subject(PATCHES[1].read_text())
    assert doc["patchset_hash"] == _shell_patchset_hash(PATCHES)
    assert kernel_json("6.12", "debian:6.12", ()) == {"release": "6.12", "spec": "debian:6.12"}
    assert patchset_hash_of_digests([]) == ""


def test_kcidb_checkout_carries_the_patchset(tmp_path):
    run = load_run(_run_with_patches(tmp_path))
    doc = document(run)
    kcidb_io.schema.LATEST.validate_exactly(doc)
    [c] = doc["checkouts"]
    assert c["patchset_hash"] == _shell_patchset_hash(PATCHES)
    assert [f["name"] for f in c["patchset_files"]] == [p.name for p in PATCHES]
    for f, p in zip(c["patchset_files"], PATCHES):
        head, _, data = f["url"].partition(",")
        assert head == "data:text/x-diff;base64" and base64.b64decode(data) == p.read_bytes()
    assert [x["subject"] for x in c["misc"]["patches"]] == [patch_subject(p.read_text()) for p in PATCHES]


def test_kcidb_leaves_out_a_copy_that_changed(tmp_path):
    path = _run_with_patches(tmp_path)
    (path / "patches" / PATCHES[0].name).write_text("changed after the run\n")
    doc = document(load_run(path))
    kcidb_io.schema.LATEST.validate_exactly(doc)
    c = doc["checkouts"][0]
    assert "patchset_files" not in c and c["patchset_hash"] == _shell_patchset_hash(PATCHES)


def test_hash_from_digests_without_the_copies(tmp_path):
    path = _run_with_patches(tmp_path)
    shutil.rmtree(path / "patches")
    doc = json.loads((path / "report.json").read_text())
    del doc["kernel"]["patchset_hash"]                  # an older writer: digests only
    (path / "report.json").write_text(json.dumps(doc))
    c = document(load_run(path))["checkouts"][0]
    assert c["patchset_hash"] == _shell_patchset_hash(PATCHES) and "patchset_files" not in c


def test_names_only_report_still_loads(tmp_path):
    path = _run_with_patches(tmp_path)
    doc = json.loads((path / "report.json").read_text())
    doc["kernel"] = {"release": "6.1.0", "spec": "debian-src:6.1", "patches": [str(p) for p in PATCHES]}
    (path / "report.json").write_text(json.dumps(doc))
    shutil.rmtree(path / "patches")
    run = load_run(path)
    assert run.kernel.patches == tuple(str(p) for p in PATCHES)
    # the files are still where the names say: the hash is computed from them
    assert run.kernel.patchset_hash == _shell_patchset_hash(PATCHES)
    kcidb_io.schema.LATEST.validate_exactly(document(run))


def test_email_and_html_name_the_patches(tmp_path):
    run = load_run(_run_with_patches(tmp_path))
    msg = email.message_from_string(render(run, "email").split("\n", 1)[1], policy=email.policy.default)
    body = msg.get_body(preferencelist=("plain",)).get_content()
    kern = " ".join(body.split("\nThe kernel\n")[1].split("\nThe machine\n")[0].split())
    for p in PATCHES:
        subj = patch_subject(p.read_text())
        digest = subprocess.run(["sha256sum", str(p)], capture_output=True, text=True, check=True).stdout[:12]
        assert f'{p.name} ("{subj}", sha256 {digest})' in kern, kern
    assert f"patchset hash (KCIDB's): {_shell_patchset_hash(PATCHES)}" in kern
    assert all(len(x) <= 75 for x in body.split("\nThe kernel\n")[1].split("\nThe machine\n")[0].splitlines())
    # the memhp run command that reproduces it carries the long --patch names, wrapped as shell lines
    how = body.split("\nHow to reproduce\n")[1]
    cmd = how.split("memhp run ", 1)[1].split("\n\n")[0].split("\nWithout memhp")[0]
    assert all(p.name in cmd for p in PATCHES) and all(len(x) <= 75 for x in how.splitlines()[:8]), how
    page = render(run, "html")
    assert PATCHES[1].name in page and _shell_patchset_hash(PATCHES) in page
