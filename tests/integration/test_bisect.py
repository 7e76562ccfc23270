"""memhp bisect on a real kernel git history (tests/bisect/history.py), real builds, real guests.

The history is Debian's linux-source-6.1 plus small commits: one breaks the build (c09, fixed by
c10), one plants a present-pages off-by-one in online_pages() that dimm_lifecycle's Movable
present check catches (c11), branch `flaky` carries the same off-by-one on about half the
boots, and branch `unbuildable` plants it in a commit that does not build (u01, fixed by u02). Every bisect here shares one object tree and ccache (the bisect folder is keyed by the
repo, base config, fragments and compiler), and `-k dimm_lifecycle` keeps each step to one boot.
The planted bisect runs once per module (its result is a fixture); the endpoint, exit-status and
regression-email tests reuse its builds, step records and run folders.
"""
from __future__ import annotations

import email
import email.policy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from memhp_helpers import MEMHP, qemu_processes, run_memhp, show

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bisect"))
import history  # noqa: E402

pytestmark = [pytest.mark.kbuild, pytest.mark.guest]

K = "dimm_lifecycle"
BISECT_TIMEOUT = 3 * 3600


def _rev(repo: Path, rev: str) -> str:
    return subprocess.run(["git", "rev-parse", rev], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()


def _state(repo: Path) -> tuple:
    """What memhp must never write in the user's repo: HEAD, index, refs, worktrees, status."""
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True, check=True).stdout  # noqa
    return (git("rev-parse", "HEAD"), git("symbolic-ref", "-q", "HEAD"), git("show-ref"),
            git("worktree", "list", "--porcelain"), git("--no-optional-locks", "status", "--porcelain"),
            (repo / ".git" / "index").stat().st_mtime_ns)


@pytest.fixture(scope="module")
def repo() -> Path:
    return history.make_history()


@pytest.fixture(scope="module")
def planted(repo, tmp_path_factory):
    """memhp bisect c00..main: (process, json, user-repo state before, after)."""
    before = _state(repo)
    out = tmp_path_factory.mktemp("bisect") / "planted.json"
    p = run_memhp(["bisect", "--tree", str(repo), "--good", "c00", "--bad", "main", "-k", K, "--json", str(out)],
                  timeout=BISECT_TIMEOUT)
    doc = json.loads(out.read_text()) if out.is_file() else {}
    return p, doc, before, _state(repo)


def test_bisect_names_the_planted_commit(repo, planted):
    p, doc, _, _ = planted
    assert p.returncode == 0, show(p)
    planted_sha = _rev(repo, history.tag_of(history.PLANTED_SUBJECT))
    fb = doc["first_bad_commit"]
    assert fb["sha"] == planted_sha, show(p)
    assert fb["subject"] == history.PLANTED_SUBJECT
    assert fb["author"] == "Eve Example <eve@example.org>"
    assert fb["files"] == ["mm/memory_hotplug.c"]
    # the signature is the check the off-by-one breaks, nothing else
    assert [s[1] for s in doc["signature"]] == ["fail"], doc["signature"]
    assert "present" in doc["signature"][0][2].lower(), doc["signature"]
    # the human output: culprit, git's own log verbatim, the step table, the wall time
    assert f"commit {planted_sha}" in p.stdout
    assert f"# first bad commit: [{planted_sha}]" in p.stdout
    assert "git bisect start" in doc["bisect_log"] and doc["bisect_log"] in p.stdout
    assert "total wall time:" in p.stdout


def test_the_build_breaking_commit_is_skipped_with_its_reason(repo, planted):
    p, doc, _, _ = planted
    broken = _rev(repo, history.tag_of(history.BREAK_SUBJECT))
    steps = {s["commit"]: s for s in doc["steps"]}
    assert broken in steps, f"git bisect never tested {broken[:12]}:{show(p)}"
    s = steps[broken]
    assert s["verdict"] == "skip" and s["why"].startswith("build failed"), s
    assert "drivers/base/memory.c" in s["why"], s
    assert f"git bisect skip {broken}" in doc["bisect_log"]
    # every step that built was judged by a real boot
    for st in doc["steps"]:
        if st["build"]:
            assert st["runs"] and st["test_s"] > 0, st


def test_the_users_repo_is_never_written(planted):
    _, _, before, after = planted
    assert before == after


def test_a_rerun_replays_the_recorded_steps(repo, planted, tmp_path):
    p0, doc0, _, _ = planted
    out = tmp_path / "again.json"
    p = run_memhp(["bisect", "--tree", str(repo), "--good", "c00", "--bad", "main", "-k", K, "--json", str(out)],
                  timeout=BISECT_TIMEOUT)
    assert p.returncode == 0, show(p)
    doc = json.loads(out.read_text())
    assert doc["first_bad_commit"] == doc0["first_bad_commit"]
    assert all(s["recorded"] for s in doc["steps"]), show(p)
    assert [s["commit"] for s in doc["steps"]] == [s["commit"] for s in doc0["steps"]]


def test_a_step_build_is_shared_with_memhp_kernel_build(repo, planted, tmp_path):
    """A clean clone at the planted commit: `memhp kernel build --tree` finds the bisect's build."""
    _, doc, _, _ = planted
    sha = doc["first_bad_commit"]["sha"]
    step = next(s for s in doc["steps"] if s["commit"] == sha)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--shared", "--no-checkout", str(repo), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", "--detach", sha], cwd=clone, check=True)
    p = run_memhp(["kernel", "build", "--tree", str(clone)], timeout=120)   # a cache hit, or it would build
    assert p.returncode == 0, show(p)
    assert p.stdout.strip() == step["build"]


def _get_maintainer(repo: Path, sha: str) -> List[str]:
    """What the tree's own scripts/get_maintainer.pl prints for the commit's patch (read-only: the
    history's work tree is at main, and no commit of the history touches MAINTAINERS or scripts/)."""
    patch = subprocess.run(["git", "format-patch", "-1", "--stdout", sha], cwd=repo, capture_output=True,
                           text=True, check=True).stdout
    r = subprocess.run(["perl", "scripts/get_maintainer.pl", "--no-git", "--no-git-fallback", "--no-rolestats"],
                       cwd=repo, input=patch, capture_output=True, text=True, timeout=120, check=True)
    return [ln.strip() for ln in r.stdout.splitlines() if "@" in ln]


def test_the_regression_email_goes_to_the_maintainers_of_the_first_bad_commit(repo, planted, tmp_path):
    """memhp report on the bisect's run folder: To/Cc from get_maintainer.pl, the culprit, regzbot."""
    _, doc, _, _ = planted
    fb, rep = doc["first_bad_commit"], doc["report"]
    assert rep["run_dir"] and (Path(rep["run_dir"]) / "report.json").is_file(), rep
    want = _get_maintainer(repo, fb["sha"])
    assert "linux-mm@kvack.org" in want, want              # an mm/ commit: MAINTAINERS names linux-mm
    assert sorted(rep["to"] + rep["cc"]) == sorted(want), rep
    assert "get_maintainer.pl" in rep["recipients_from"], rep
    out = tmp_path / "report.mbox"
    p = run_memhp(["report", rep["run_dir"], "--format", "email", "-o", str(out)], timeout=120)
    assert p.returncode == 0, show(p)
    text = out.read_text()
    msg = email.message_from_string(text.split("\n", 1)[1], policy=email.policy.default)
    to = [a.strip() for a in str(msg["To"]).split(",")]
    cc = [a.strip() for a in str(msg["Cc"] or "").split(",") if a.strip()]
    assert to == rep["to"] and to, (to, rep)
    assert all("<" in a for a in to), to                    # people (maintainers) in To, lists in Cc
    assert [a for a in cc if a != "regressions@lists.linux.dev"] == rep["cc"], (cc, rep)
    assert "linux-mm@kvack.org" in cc
    body = msg.get_content()
    assert f'commit {fb["sha"][:12]} ("{fb["subject"]}")' in body, body
    assert f"\n#regzbot introduced: {fb['sha']}\n" in body + "\n", body
    # the robot's table: the parent and the culprit, and the runs on each
    parent = _rev(repo, fb["sha"] + "^")
    assert re.search(rf"\|\s+\| {parent[:12]}\s+\| {fb['sha'][:12]}\s+\|", body), body
    assert re.search(r"\| runs\s+\| 1\s+\| 1\s+\|", body), body
    assert "/.cache/" not in text


def test_only_skipped_commits_left_is_inconclusive(repo, planted, tmp_path):
    """c08..unbuildable: u01 (the bug, but no build) is skipped, so git cannot tell u01 from u02: exit 1,
    both candidates listed, u01 as skipped with the compiler's error."""
    out = tmp_path / "inconclusive.json"
    p = run_memhp(["bisect", "--tree", str(repo), "--good", "c08", "--bad", "unbuildable", "-k", K,
                   "--json", str(out)], timeout=BISECT_TIMEOUT)
    assert p.returncode == 1, show(p)
    doc = json.loads(out.read_text())
    u01, u02 = _rev(repo, "u01"), _rev(repo, "u02")
    assert doc["first_bad_commit"] is None
    assert sorted(doc["candidates"]) == sorted([u01, u02]), doc["candidates"]
    assert [s["commit"] for s in doc["skipped"]] == [u01], doc["skipped"]
    why = doc["skipped"][0]["why"]
    assert why.startswith("build failed") and "mm/memory_hotplug.c" in why, why
    assert f"git bisect skip {u01}" in doc["bisect_log"]
    assert "inconclusive" in p.stdout and f"{u01} (skip: build failed" in p.stdout, show(p)
    assert f"{u02} (bad" in p.stdout, show(p)


def _path_without_qemu(tmp: Path) -> str:
    """A PATH holding every program of this PATH but qemu-system-*: the host lacks QEMU, for real."""
    farm = tmp / "bin"
    farm.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            src = Path(d) / name
            if name.startswith("qemu-system") or (farm / name).exists() or not os.access(src, os.X_OK):
                continue
            (farm / name).symlink_to(src)
    return str(farm)


def test_an_infrastructure_failure_exits_3_and_records_nothing(repo, planted, tmp_path):
    """No QEMU on the host: the bad endpoint (built by the planted bisect) cannot be tested; exit 3
    with one line naming QEMU, no guest, the user's repo untouched, and the step is not recorded
    (a second try tests it again instead of replaying a skip)."""
    before = _state(repo)
    env = dict(os.environ, PATH=_path_without_qemu(tmp_path), TMPDIR=str(tmp_path))
    out = tmp_path / "infra.json"
    argv = [MEMHP, "bisect", "--tree", str(repo), "--good", "c00", "--bad", "main", "-k", K, "--repeat", "2",
            "--json", str(out)]
    for attempt in (1, 2):
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
        assert p.returncode == 3, show(p)
        last = p.stderr.strip().splitlines()[-1]
        assert "qemu-system-x86_64" in last and "bad endpoint" in last, show(p)
        assert "Traceback" not in p.stderr
        assert "(recorded)" not in p.stderr, f"attempt {attempt} replayed an infrastructure skip:{show(p)}"
        assert json.loads(out.read_text())["status"] == 3
    assert not qemu_processes(str(tmp_path))
    assert _state(repo) == before


def test_swapped_endpoints_are_bad_input(repo):
    p = run_memhp(["bisect", "--tree", str(repo), "--good", "main", "--bad", "c00", "-k", K], timeout=120)
    assert p.returncode == 2, show(p)
    assert "swapped?" in p.stderr and len(p.stderr.strip().splitlines()) == 1, show(p)


def test_a_good_endpoint_that_fails_stops_with_both_results(repo, planted):
    p = run_memhp(["bisect", "--tree", str(repo), "--good", history.tag_of(history.PLANTED_SUBJECT),
                   "--bad", "main", "-k", K], timeout=BISECT_TIMEOUT)
    assert p.returncode == 2, show(p)
    assert "--good" in p.stderr and "does not pass" in p.stderr, show(p)
    assert "bad endpoint" in p.stderr and "good endpoint" in p.stderr, show(p)


def test_a_bad_endpoint_that_passes_stops(repo, planted):
    p = run_memhp(["bisect", "--tree", str(repo), "--good", "c00", "--bad", history.tag_of(history.FIX_SUBJECT),
                   "-k", K], timeout=BISECT_TIMEOUT)
    assert p.returncode == 2, show(p)
    assert "--bad" in p.stderr and "does not fail" in p.stderr, show(p)


# ---------------------------------------------------------------- git bisect run + memhp run --bisect

def _script(tmp: Path, builds: dict, k: str = K) -> Path:
    """The per-commit script: memhp run --bisect on the bisect's build of HEAD; a commit without one
    (its build failed) runs on a host whose QEMU cannot start."""
    links = tmp / "builds"
    links.mkdir()
    for sha, folder in builds.items():
        (links / sha).symlink_to(folder)
    broken = tmp / "broken-qemu"
    broken.mkdir()
    fake = broken / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho 'qemu: cannot start (test)' >&2\nexit 1\n")
    fake.chmod(0o755)
    s = tmp / "step.sh"
    s.write_text(f"""#!/bin/sh
sha=$(git rev-parse HEAD)
if [ -e {links}/$sha ]; then
    exec {MEMHP} run --bisect --kernel {links}/$sha -k '{k}'
fi
PATH={broken}:$PATH exec {MEMHP} run --bisect --kernel {links}/$(ls {links} | head -1) -k '{k}'
""")
    s.chmod(0o755)
    return s


def _clone(repo: Path, tmp: Path) -> Path:
    """A clone for git bisect run whose checkouts write one file: the step script reads only HEAD,
    and a full linux-source work tree costs minutes to write and to delete on a loaded host."""
    c = tmp / "clone"
    subprocess.run(["git", "clone", "-q", "--shared", "--no-checkout", str(repo), str(c)], check=True)
    subprocess.run(["git", "sparse-checkout", "set", "--no-cone", "/Makefile"], cwd=c, check=True)
    subprocess.run(["git", "checkout", "-q", "main"], cwd=c, check=True)
    return c


def test_git_bisect_run_reads_memhp_run_bisect_statuses(repo, planted, tmp_path):
    """good c07, bad c12, real git: c09 (no kernel, QEMU cannot start: INFRA) exits 125 and is
    skipped, c10 passes (0, good), c11 fails (1, bad) and is named."""
    _, doc, _, _ = planted
    builds = {s["commit"]: s["build"] for s in doc["steps"] if s["build"]}
    c = _clone(repo, tmp_path)
    script = _script(tmp_path, builds)
    g = lambda *a: subprocess.run(["git", *a], cwd=c, capture_output=True, text=True, timeout=BISECT_TIMEOUT)  # noqa
    assert g("bisect", "start", "c12", "c07").returncode == 0
    r = g("bisect", "run", str(script))
    log = g("bisect", "log").stdout
    planted_sha = _rev(repo, "c11")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{planted_sha} is the first bad commit" in r.stdout, r.stdout
    assert f"git bisect skip {_rev(repo, 'c09')}" in log, log          # 125: infrastructure
    assert f"git bisect good {_rev(repo, 'c10')}" in log, log          # 0: pass
    assert f"git bisect bad {planted_sha}" in log, log                 # 1: kernel failure


def test_git_bisect_run_aborts_on_bad_input(repo, planted, tmp_path):
    """128 (bad input: a -k that selects nothing) aborts git bisect run; no commit gets a verdict."""
    _, doc, _, _ = planted
    builds = {s["commit"]: s["build"] for s in doc["steps"] if s["build"]}
    c = _clone(repo, tmp_path)
    script = _script(tmp_path, builds, k="no_such_scenario_zzz")
    g = lambda *a: subprocess.run(["git", *a], cwd=c, capture_output=True, text=True, timeout=600)  # noqa
    assert g("bisect", "start", "c12", "c07").returncode == 0
    before = g("bisect", "log").stdout
    r = g("bisect", "run", str(script))
    assert r.returncode != 0, r.stdout
    assert "exit code 128" in r.stdout + r.stderr, r.stdout + r.stderr
    assert g("bisect", "log").stdout == before


# ---------------------------------------------------------------- flaky

def test_repeat_names_the_flaky_commit_and_its_rate(repo, tmp_path):
    """--repeat 10 on c04..flaky: the commit that fails about half the boots, and a rate in (0, 1).

    Chance this test fails although memhp is right: a run set of 10 where the flaky kernel never
    fails (2^-10 per bad step, at most 3 of them) or always fails: below 0.5%.
    """
    out = tmp_path / "flaky.json"
    p = run_memhp(["bisect", "--tree", str(repo), "--good", "c04", "--bad", "flaky", "-k", K, "--repeat", "10",
                   "--json", str(out)], timeout=BISECT_TIMEOUT)
    assert p.returncode == 0, show(p)
    doc = json.loads(out.read_text())
    assert doc["first_bad_commit"]["sha"] == _rev(repo, history.tag_of(history.FLAKY_SUBJECT)), show(p)
    rate = doc["reproduction_rate"]
    assert 0.1 <= rate <= 0.9, rate                      # binomial(10, 0.5) lands here 99.8% of the time
    good = [s for s in doc["steps"] if s["verdict"] == "good"]
    assert good and all(len(s["runs"]) == 10 for s in good), doc["steps"]
    # the figure: the product over the good steps of (1 - rate)^runs (runs that gave a verdict)
    want = 1.0
    for s in good:
        want *= (1 - rate) ** sum(1 for r in s["runs"] if r["verdict"] in ("good", "bad"))
    assert doc["missed_probability"] == pytest.approx(want, rel=1e-9), doc["missed_probability"]
    assert 0 < doc["missed_probability"] < 0.05 and 0 < doc["any_missed_probability"] < 0.05, doc
    assert "reproduction rate on the bad endpoint" in p.stdout
    assert "product over good steps of (1 - rate)^runs" in p.stdout


def test_ctrl_c_stops_every_qemu_and_leaves_the_repo_alone(repo, planted, tmp_path):
    """SIGINT to the process group (what a terminal's Ctrl-C does) while a step's guest runs:
    exit 130, no QEMU left, nothing written to the user's repo, and the step is not recorded."""
    import signal
    import time
    before = _state(repo)
    env = dict(os.environ, TMPDIR=str(tmp_path))
    # --repeat 3 on c00..c10 (both built by the planted bisect): a new record, so it boots
    p = subprocess.Popen([MEMHP, "bisect", "--tree", str(repo), "--good", "c00", "--bad", "c10", "-k", K,
                          "--repeat", "3"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while not qemu_processes(str(tmp_path)) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert qemu_processes(str(tmp_path)), f"no guest started (exit {p.poll()})"
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, out + err
    deadline = time.monotonic() + 30
    while qemu_processes(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not qemu_processes(str(tmp_path)), err
    assert _state(repo) == before
