"""The CI templates under ci/ (GitHub Actions, GitLab CI): they parse, they have what issue 14 asks
for, and every command any job runs goes through ci/memhp-ci.sh with a subcommand the script has.
(No CI engine is reachable here; tests/integration/test_ci_matrix.py runs the script itself.)"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
import yaml

CI = Path(__file__).resolve().parents[2] / "ci"
SCRIPT = CI / "memhp-ci.sh"
GITHUB, CALLER, GITLAB = CI / "github" / "memhp.yml", CI / "github" / "example-caller.yml", \
    CI / "gitlab" / "memhp.gitlab-ci.yml"


def _load(p: Path) -> dict:
    doc = yaml.safe_load(p.read_text())
    assert isinstance(doc, dict), p
    return doc


def _on(doc: dict) -> dict:
    return doc.get("on", doc.get(True))     # YAML 1.1 reads a bare `on` key as True


def _subcommands() -> List[str]:
    """The subcommands the script's final `case` dispatches."""
    text = SCRIPT.read_text()
    block = text[text.rindex('case "${1:-}" in'):]
    return re.findall(r"^\s+([a-z-]+)\)", block, re.M)


def _commands(p: Path) -> Iterator[Tuple[str, str]]:
    """(job, command line) for every shell line any job of the template runs."""
    doc = _load(p)
    if p.parent.name == "github":
        for name, job in doc["jobs"].items():
            for step in job.get("steps", []):
                for line in str(step.get("run", "")).splitlines():
                    if line.strip():
                        yield name, line.strip()
    else:
        for name, job in doc.items():
            if not isinstance(job, dict):
                continue
            for key in ("before_script", "script", "after_script"):
                for line in job.get(key, []) or []:
                    yield name, str(line).strip()


@pytest.mark.parametrize("path", [GITHUB, CALLER, GITLAB], ids=lambda p: p.name)
def test_templates_parse(path):
    _load(path)


def test_script_is_valid_bash_and_executable():
    assert SCRIPT.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert set(_subcommands()) == {"setup", "shards", "run", "merge", "summary", "kcidb-submit"}


@pytest.mark.parametrize("path", [GITHUB, GITLAB], ids=lambda p: p.name)
def test_every_job_command_goes_through_the_script(path):
    subs = _subcommands()
    cmds = list(_commands(path))
    assert cmds, f"{path}: no command found"
    jobs = {j for j, _ in cmds}
    for job, line in cmds:
        line = line.split("#")[0].strip()
        m = re.fullmatch(r"(?:memhp/)?ci/memhp-ci\.sh\s+([a-z-]+)(?:\s+.*)?", line)
        assert m, f"{path.name} job {job}: {line!r} does not go through ci/memhp-ci.sh"
        assert m.group(1) in subs, f"{path.name} job {job}: unknown subcommand {m.group(1)}"
    # every job runs something (none sneaks its work into an action or an image entrypoint)
    doc = _load(path)
    names = doc["jobs"] if path.parent.name == "github" else \
        {k: v for k, v in doc.items() if isinstance(v, dict) and "stage" in v}
    assert set(names) <= jobs, set(names) - jobs


def test_github_reusable_workflow():
    doc = _load(GITHUB)
    call = _on(doc)["workflow_call"]
    assert {"kernels", "tree", "ref", "fragments", "patches", "shards"} <= set(call["inputs"])
    test = doc["jobs"]["test"]
    matrix = test["strategy"]["matrix"]
    assert "fromJSON(inputs.kernels)" in matrix["kernel"] and "fromJSON(needs.plan.outputs.shards)" in matrix["shard"]
    assert test["strategy"]["fail-fast"] is False
    steps = test["steps"]
    upload = [s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert upload and all(s.get("if") == "always()" for s in upload)
    junit = [s for s in steps if "junit" in str(s.get("uses", "")).lower()]
    assert junit and junit[0].get("if") == "always()" and "junit.xml" in junit[0]["with"]["report_paths"]
    assert any("memhp-ci.sh run" in str(s.get("run", "")) for s in steps)
    merge = doc["jobs"]["merge"]
    assert merge["if"] == "always()" and merge["needs"] == "test"
    assert any("memhp-ci.sh merge" in str(s.get("run", "")) for s in merge["steps"])
    # the script is what writes the kernel x scenario table to the step summary
    assert '>> "$GITHUB_STEP_SUMMARY"' in SCRIPT.read_text() and "--format markdown" in SCRIPT.read_text()


def test_example_caller_uses_declared_inputs():
    inputs = _on(_load(GITHUB))["workflow_call"]["inputs"]
    caller = _load(CALLER)
    job = caller["jobs"]["memhp"]
    assert job["uses"] == "./.github/workflows/memhp.yml"
    assert set(job["with"]) <= set(inputs), set(job["with"]) - set(inputs)


def test_gitlab_template():
    doc = _load(GITLAB)
    job = doc["memhp"]
    matrix = job["parallel"]["matrix"][0]
    assert len(matrix["MEMHP_KERNEL"]) >= 2 and matrix["MEMHP_SHARD"] == ["1/2", "2/2"]
    assert job["artifacts"]["when"] == "always" and "junit.xml" in job["artifacts"]["reports"]["junit"]
    merge = doc["memhp-merge"]
    assert merge["when"] == "always" and merge["artifacts"]["when"] == "always"
    assert merge["script"] == ["ci/memhp-ci.sh merge"]
    assert re.search(r'"\$MEMHP" report --merge ', SCRIPT.read_text())


def test_shards_subcommand(tmp_path):
    out = tmp_path / "gh_output"
    p = subprocess.run([str(SCRIPT), "shards", "3"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "GITHUB_OUTPUT": str(out)})
    assert p.returncode == 0 and p.stdout.strip() == '["1/3", "2/3", "3/3"]'
    assert out.read_text() == 'shards=["1/3", "2/3", "3/3"]\n'
    bad = subprocess.run([str(SCRIPT), "shards", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "positive whole number" in bad.stderr


def test_unknown_subcommand_is_bad_input():
    p = subprocess.run([str(SCRIPT), "frobnicate"], capture_output=True, text=True)
    assert p.returncode == 2 and "usage:" in p.stderr


