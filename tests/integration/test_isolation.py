"""Two `memhp run` at once on one machine: both pass, and they share no port, socket or folder.

Both runs get the same TMPDIR and the default artifacts location, as two users of one host
would, so any separation comes from memhp itself.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import MEMHP, qemu_processes

pytestmark = pytest.mark.guest

SCENARIO = "block_sized_dimm_lifecycle"


def _argv_facts(argv_text: str) -> dict:
    port = re.search(r"hostfwd=tcp:127\.0\.0\.1:(\d+)-:22", argv_text)
    con = re.search(r"socket,id=con0,path=([^,\s']+)", argv_text)
    qmp = re.search(r"socket,id=qmp0,path=([^,\s']+)", argv_text)
    assert port and con and qmp, argv_text
    return {"port": int(port.group(1)), "console": con.group(1), "qmp": qmp.group(1),
            "run_dir": str(Path(con.group(1)).parent)}


def test_two_runs_at_once(session_tmp, memhp_spec):
    tmp = Path(tempfile.mkdtemp(prefix="iso-", dir=session_tmp))
    env = dict(os.environ, TMPDIR=str(tmp))
    argv = [str(MEMHP), "run", "--kernel", memhp_spec, "--accel", "auto", "-k", SCENARIO]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL) for _ in range(2)]
    seen, overlap = {}, 0
    try:
        deadline = time.monotonic() + 600
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            live = qemu_processes(str(tmp))
            overlap = max(overlap, len(live))
            for pid, a in live:
                seen.setdefault(pid, a)
            time.sleep(0.1)
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"exit {p.returncode}\n{out[-2000:]}\n{err[-2000:]}"
        assert "memhp: 1 pass, 0 fail, 0 crash, 0 hang, 0 infra, 0 skip (1 scenarios)" in out, out[-1000:]
    assert overlap == 2, f"the two runs' guests never ran at the same time (max {overlap}); nothing was tested"
    assert len(seen) == 2, seen

    # Live argv (from /proc) and the argv.txt each run saved: the same facts, all distinct.
    live = [_argv_facts(" ".join(a)) for a in seen.values()]
    arts = [Path(re.search(r"artifacts in (\S+)", err).group(1)) for _, err in outs]
    assert arts[0] != arts[1] and not arts[0].is_relative_to(arts[1]) and not arts[1].is_relative_to(arts[0])
    saved = []
    for a in arts:
        files = sorted(a.rglob("argv.txt"))
        assert files, f"no argv.txt under {a}"
        saved.append(_argv_facts(files[0].read_text()))
    assert sorted(map(str, live), key=str) == sorted(map(str, saved), key=str), (live, saved)
    for key in ("port", "console", "qmp", "run_dir"):
        assert saved[0][key] != saved[1][key], f"both runs used the same {key}: {saved[0][key]}"
    for d in (s["run_dir"] for s in saved):
        assert not Path(d).exists(), f"run folder {d} left behind"
    assert not qemu_processes(str(tmp))
    print(f"ports {saved[0]['port']} / {saved[1]['port']}, run folders {saved[0]['run_dir']} / "
          f"{saved[1]['run_dir']}, artifacts {arts[0]} / {arts[1]}")


# ---------------------------------------------------------------- the cache under faults and concurrency

def _no_scratch_left(cache: Path) -> None:
    left = [p for p in cache.rglob(".tmp.*")]
    assert left == [], f"scratch entries left behind: {left}"


def test_truncated_cached_deb_is_fetched_again(memhp_cli, tmp_path):
    """A .deb cut short in the cache (Ctrl-C mid-download by an older memhp) is noticed, named in one
    warning line, downloaded again and verified; the kernel is then extracted from the good file."""
    from harness import host
    from harness.cache import cache_root
    real = sorted((cache_root() / "debs").glob("linux-image-6.1.0-*-cloud-amd64-unsigned_*.deb"))
    if not real:       # nothing cached yet: fetch it once into the real cache
        assert memhp_cli(["kernel", "fetch", "debian:6.1"], timeout=900).rc == 0
        real = sorted((cache_root() / "debs").glob("linux-image-6.1.0-*-cloud-amd64-unsigned_*.deb"))
    good = real[-1]
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    bad = cache / "debs" / good.name
    bad.write_bytes(good.read_bytes()[:good.stat().st_size // 3])

    res = memhp_cli(["kernel", "fetch", "debian:6.1"], env={"MEMHP_CACHE": str(cache)}, timeout=900)
    assert res.rc == 0, res
    warnings = [ln for ln in res.err_lines if "damaged" in ln]
    assert len(warnings) == 1 and warnings[0] == (
        f"memhp: warning: cached {good.name} is damaged ({good.stat().st_size // 3} bytes, apt says "
        f"{good.stat().st_size}); downloading it again"), res
    rec = host.apt_record(good.name.split("_")[0], host.deb_version(good))
    assert host.deb_problem(bad, rec) is None, "the cached .deb is still not the one apt announced"
    assert bad.read_bytes() == good.read_bytes()
    out = Path(res.stdout.strip())
    assert out.parent.parent == cache / "kernels" and (out.parent / ".complete").is_file(), res
    assert sorted(out.glob("vmlinuz-6.1.0-*")), res
    _no_scratch_left(cache)


def test_two_cold_cache_runs_at_once(session_tmp, tmp_path):
    """Two `memhp run` on one EMPTY cache at the same time: both download, extract and build the
    image into the same entries (one waits on the other's lock) and both pass."""
    cache = Path(tempfile.mkdtemp(prefix="cold-", dir=tmp_path))
    tmp = Path(tempfile.mkdtemp(prefix="iso-cold-", dir=session_tmp))
    env = dict(os.environ, TMPDIR=str(tmp), MEMHP_CACHE=str(cache))
    env.pop("MEMHP_KERNEL", None)
    argv = [str(MEMHP), "run", "--kernel", "debian:6.1", "-k", "param_readback and y"]   # one short boot
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=1200) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"exit {p.returncode}\n{out[-2000:]}\n{err[-2000:]}"
        m = re.search(r"memhp: (\d+) pass, 0 fail, 0 crash, 0 hang, 0 infra, 0 skip \((\d+) scenarios\)", out)
        assert m and m.group(1) == m.group(2) and int(m.group(1)) >= 1, out[-1000:]
    kernels = [d for d in (cache / "kernels").iterdir() if not d.name.startswith(".")]
    images = [d for d in (cache / "images").iterdir() if not d.name.startswith(".")]
    debs = list((cache / "debs").glob("*.deb"))
    assert len(kernels) == 1 and (kernels[0] / ".complete").is_file(), kernels
    assert len(images) == 1 and (images[0] / ".complete").is_file(), images
    assert len(debs) == 1, debs
    for d in [cache] + kernels + images + [cache / "kernels", cache / "images", cache / "debs"]:
        assert d.stat().st_mode & 0o077 == 0, f"{d} is mode {d.stat().st_mode & 0o777:o}, not 0700"
    _no_scratch_left(cache)
    assert not qemu_processes(str(tmp))


def _busy_in(root: Path) -> list:
    """Live processes whose argv names root (memhp's own children: dpkg-deb, apt-get)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if str(root).encode() in (d / "cmdline").read_bytes() and \
                        "\nState:\tZ" not in (d / "status").read_text():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def test_sigkilled_extraction_is_cleaned_up_and_redone(memhp_cli, tmp_path):
    """memhp killed -9 while dpkg-deb extracts leaves a scratch folder named after its PID; the next
    run removes it (its owner is dead), takes the entry's lock and extracts again."""
    from harness.cache import cache_root
    real = sorted((cache_root() / "debs").glob("linux-image-6.1.0-*-cloud-amd64-unsigned_*.deb"))
    assert real, "debian:6.1 is not in the cache (test_truncated_cached_deb_is_fetched_again fetches it)"
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    shutil.copy(real[-1], cache / "debs" / real[-1].name)
    tmp = Path(tempfile.mkdtemp(prefix="kill-", dir=tmp_path))
    env = dict(os.environ, MEMHP_CACHE=str(cache), TMPDIR=str(tmp))
    p = subprocess.Popen([str(MEMHP), "kernel", "fetch", "debian:6.1"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    scratch = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None and not scratch:
        scratch = [d for d in (cache / "kernels").glob(f".tmp.{p.pid}.extract.*") if any(d.iterdir())]
        time.sleep(0.05)
    p.kill()
    p.communicate()
    assert scratch, f"never saw memhp {p.pid} extracting (exit {p.returncode})"
    deadline = time.monotonic() + 120       # its dpkg-deb, orphaned, finishes writing into the scratch
    while _busy_in(cache) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert scratch[0].exists() and not list((cache / "kernels").glob("*/.complete"))

    res = memhp_cli(["kernel", "fetch", "debian:6.1"], env={"MEMHP_CACHE": str(cache)}, timeout=900)
    assert res.rc == 0 and not res.err_lines, res
    assert not scratch[0].exists(), f"{scratch[0]} of dead PID {p.pid} was not cleaned up"
    out = Path(res.stdout.strip())
    assert (out.parent / ".complete").is_file() and sorted(out.glob("vmlinuz-6.1.0-*")), res
    _no_scratch_left(cache)


@pytest.mark.parametrize("how", ["world-writable", "group-writable", "another user's"])
def test_unsafe_cache_root_is_refused(memhp_cli, tmp_path, how):
    """A cache others can write to (or that is not ours) could hand memhp a planted kernel: exit 2, one line,
    nothing written into it."""
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    if how == "world-writable":
        os.chmod(root, 0o777)
    elif how == "group-writable":
        os.chmod(root, 0o770)
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        os.chown(root, 65534, 65534)
    res = memhp_cli(["kernel", "fetch", "debian:6.1"], env={"MEMHP_CACHE": str(root)}, timeout=120)
    assert res.rc == 2, res
    assert len(res.err_lines) == 1 and res.err_lines[0].startswith(f"memhp: error: cache folder {root} "), res
    assert ("writable" in res.err_lines[0]) if how != "another user's" else ("belongs to uid 65534" in res.err_lines[0])
    assert list(root.iterdir()) == [], "memhp wrote into a cache folder it refused"
