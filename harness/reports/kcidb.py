"""KCIDB I/O v5 (kernelci/kcidb-io): one checkout, one build, one test per scenario.

Outcome map: PASS->PASS, FAIL->FAIL, CRASH->FAIL (the splat in log_excerpt), HANG->ERROR,
INFRA->ERROR, SKIP->SKIP. No nulls and no properties the schema does not name; memhp's own
data (measurements, outcome class, the QEMU machine) goes into `misc`. Test paths are
`memhp.<module>.<scenario>`, each part reduced to the schema's [a-zA-Z0-9_-].
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from harness.reports.rundir import RunData, Scenario, scrub_paths

ORIGIN = "memhp"
VERSION = {"major": 5, "minor": 3}
STATUS = {"pass": "PASS", "fail": "FAIL", "crash": "FAIL", "hang": "ERROR", "infra": "ERROR", "skip": "SKIP"}
LOG_EXCERPT_MAX = 16384
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def path_part(text: str) -> str:
    """One dot-separated part of a KCIDB test path: [a-zA-Z0-9_-]+."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "unnamed"


def kcidb_path(s: Scenario) -> str:
    return f"memhp.{path_part(s.module)}.{path_part(s.case)}"


def drop_nulls(v: Any) -> Any:
    """The value without None anywhere (KCIDB allows no nulls), tuples as lists."""
    if isinstance(v, dict):
        return {str(k): drop_nulls(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        return [drop_nulls(x) for x in v if x is not None]
    if isinstance(v, float) and v != v:        # NaN is not JSON
        return str(v)
    return v


def log_excerpt(s: Scenario, run: RunData) -> str:
    """What a reader needs first: failed checks, the splat, or the message; paths scrubbed."""
    parts: List[str] = []
    if s.checks:
        for c in s.checks:
            parts.append(f"{c.name}: expected {c.expected}, observed {c.observed}\n  rule: {c.rule}")
    if s.outcome == "crash" and s.splat:
        parts.append(s.splat.text)
    if not parts and s.message:
        parts.append(s.message)
    text = scrub_paths("\n".join(parts), [run.path]).replace("\0", "")
    if len(text) > LOG_EXCERPT_MAX:
        text = text[:LOG_EXCERPT_MAX - 20] + "\n... (truncated)"
    return text


def _checkout_key(run: RunData) -> str:
    k = run.kernel
    return hashlib.sha256("\0".join([k.release, k.spec, k.tree, k.commit, k.patchset_hash,
                                     ",".join(k.patches)]).encode()).hexdigest()[:16]


def patchset_files(k: Any) -> List[Dict[str, str]]:
    """KCIDB resources for the patches, in order: each a data: URI of the copy memhp kept in
    RUN_DIR/patches (the run folder is often all there is, and the URI needs no server).
    Only when every patch is there and matches its recorded sha256; else [] (the names stay in misc)."""
    if not k.patches or k.patch_dir is None:
        return []
    out = []
    digests = {f.file: f.sha256 for f in k.patch_files}
    for name in k.patches:
        try:
            data = (Path(k.patch_dir) / name).read_bytes()
        except OSError:
            return []
        if digests.get(name) and hashlib.sha256(data).hexdigest() != digests[name]:
            return []
        out.append({"name": name, "url": "data:text/x-diff;base64," + base64.b64encode(data).decode()})
    return out


def _run_key(run: RunData) -> str:
    return hashlib.sha256(json.dumps(run.raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _time(run: RunData) -> str:
    return run.finished.strftime("%Y-%m-%dT%H:%M:%SZ")


def document(run: RunData) -> Dict[str, Any]:
    """The KCIDB object (a dict) for run."""
    k, m = run.kernel, run.machine
    ck = _checkout_key(run)
    checkout_id, build_id = f"{ORIGIN}:{ck}", f"{ORIGIN}:{ck}-build"
    checkout: Dict[str, Any] = {
        "id": checkout_id, "origin": ORIGIN,
        "tree_name": k.spec or "unknown",
        "comment": f"kernel {k.release or '?'}" + (f" ({k.spec})" if k.spec else ""),
        "valid": True,
        "misc": {"release": k.release, "spec": k.spec, "patches": list(k.patches)},
    }
    if k.tree.startswith("https://"):
        checkout["git_repository_url"] = k.tree
    elif k.tree:
        checkout["misc"]["tree"] = scrub_paths(k.tree)
    if _SHA1.match(k.commit):
        checkout["git_commit_hash"] = k.commit
    if k.commit_subject:
        checkout["misc"]["commit_subject"] = k.commit_subject     # git_commit_message wants the whole message
    if k.branch:
        checkout["git_repository_branch"] = k.branch
    if k.patches or k.patchset_hash:
        # A patchset without a recorded hash cannot be hashed here (names only); say so in misc.
        if _SHA256.match(k.patchset_hash):
            checkout["patchset_hash"] = k.patchset_hash
        else:
            checkout["misc"]["patchset_hash_unknown"] = True
        files = patchset_files(k)
        if files:
            checkout["patchset_files"] = files
        if k.patch_files:
            checkout["misc"]["patches"] = [{"name": f.file, "sha256": f.sha256, "subject": f.subject}
                                           for f in k.patch_files]
    else:
        checkout["patchset_hash"] = ""

    config_name = "+".join([k.base] + [f.rsplit("/", 1)[-1] for f in k.fragments]) if k.base else \
        (k.spec or "unknown")
    build: Dict[str, Any] = {
        "id": build_id, "origin": ORIGIN, "checkout_id": checkout_id, "architecture": "x86_64",
        "config_name": config_name,
        # A prebuilt kernel that booted counts as a good build; a failed build never gets this far.
        "status": k.build_status if k.build_status in STATUS.values() else "PASS",
        "comment": f"kernel {k.release or '?'}",
        "misc": {"release": k.release, "config_source": k.config_source,
                 "prebuilt": k.build_seconds is None},
    }
    if k.compiler:
        build["compiler"] = k.compiler
    if k.build_seconds is not None:
        build["duration"] = float(k.build_seconds)
    if k.config is not None:
        build["misc"]["config"] = {s: k.symbol(s) for s in
                                   ("CONFIG_MEMCG", "CONFIG_HUGETLB_PAGE", "CONFIG_MHP_MEMMAP_ON_MEMORY",
                                    "CONFIG_DEBUG_VM", "CONFIG_MEMORY_HOTPLUG", "CONFIG_MEMORY_HOTREMOVE")}

    env = {"comment": f"QEMU {m.qemu_version or '?'} -M {m.machine or '?'}, accel {m.accel or '?'}, "
                      f"-m {m.memory or '?'}, -smp {m.smp or '?'}",
           "misc": {"qemu_version": m.qemu_version, "qemu_package": m.qemu_package, "machine": m.machine,
                    "accel": m.accel, "memory": m.memory, "smp": m.smp, "cpu": m.cpu}}
    rk = _run_key(run)
    tests = []
    for s in run.scenarios:
        t: Dict[str, Any] = {
            "id": f"{ORIGIN}:{rk}:{kcidb_path(s)}", "origin": ORIGIN, "build_id": build_id,
            "path": kcidb_path(s), "status": STATUS.get(s.outcome, "ERROR"),
            "duration": round(float(s.duration), 3), "start_time": _time(run),
            "comment": s.name, "environment": env,
            "misc": {"outcome": s.outcome.upper(), "measurements": dict(s.measurements)},
        }
        ex = log_excerpt(s, run)
        if ex:
            t["log_excerpt"] = ex
        if s.checks:
            t["misc"]["failed_checks"] = [{"name": c.name, "expected": c.expected, "observed": c.observed,
                                           "rule": c.rule} for c in s.checks]
        if s.splat:
            t["misc"]["splat_kind"] = s.splat.kind
        tests.append(t)
    return drop_nulls({"version": dict(VERSION), "checkouts": [checkout], "builds": [build], "tests": tests})


def render(run: RunData) -> str:
    return json.dumps(document(run), indent=2, sort_keys=False, default=str) + "\n"


def document_many(runs: Sequence[RunData]) -> Dict[str, Any]:
    """Several kernels in one KCIDB object: each kernel's checkout, build and tests (ids differ per kernel)."""
    out: Dict[str, Any] = {"version": dict(VERSION), "checkouts": [], "builds": [], "tests": []}
    for run in runs:
        doc = document(run)
        for key in ("checkouts", "builds", "tests"):
            seen = {x["id"] for x in out[key]}
            out[key] += [x for x in doc[key] if x["id"] not in seen]
    return out


def render_many(runs: Sequence[RunData]) -> str:
    return json.dumps(document_many(runs), indent=2, sort_keys=False, default=str) + "\n"


def validate(text_or_doc: Any) -> Optional[str]:
    """None when kcidb-io (a test dependency) accepts the document, else the error's first line."""
    import kcidb_io
    doc = json.loads(text_or_doc) if isinstance(text_or_doc, str) else text_or_doc
    try:
        kcidb_io.schema.LATEST.validate_exactly(doc)
    except Exception as e:     # jsonschema.ValidationError; its text is long
        return str(e).splitlines()[0]
    return None
