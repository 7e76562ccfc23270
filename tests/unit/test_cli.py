"""harness.cli without guests: size parsing, input checks, argparse wiring, exit-status mapping.

The exit-status tests replace a subcommand's function with one that raises, or pytest.main with
a writer of canned results; everything that boots a guest is in tests/integration/test_boot.py
and test_run_e2e.py, and the bad-input table drives the real command in test_badinput.py.
"""
from __future__ import annotations

import signal

import pytest

from harness import cli
from harness.reports import report
from harness.cli import MiB, check_dimms, memmap_value, parse_size
from harness.errors import (CacheError, GuestCrash, Hang, HostCommandError, HostToolMissing, InfraError,
                            KernelError, PackageError, QMPCommandError, UsageError, VMLaunchFailure)


@pytest.fixture(autouse=True)
def _keep_sigterm():
    # cli.main() installs its own SIGTERM handler; give pytest its own back.
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------- parse_size: one unit rule
@pytest.mark.parametrize("text,want", [
    ("128M", 128 * MiB), ("128m", 128 * MiB), ("1G", 1 << 30), ("1g", 1 << 30), ("512MiB", 512 * MiB),
    ("2GiB", 2 << 30), ("64K", 64 << 10), ("1T", 1 << 40), (" 256M ", 256 * MiB), ("4MB", 4 * MiB),
    ("128", 128 * MiB), ("4095", 4095 * MiB), ("4096", 4096 * MiB),   # a bare number is MiB, always
    ("134217728", 134217728 * MiB),
    ("4096B", 4096),                                                   # bytes only when said
])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "M", "1.5G", "-1G", "12X", "1 G B", "one", "128iB", "0x10"])
def test_parse_size_rejects_with_a_usage_error(text):
    with pytest.raises(UsageError, match="bad size"):
        parse_size(text)


def test_size_mib_same_rule_and_whole_mib():
    assert cli.size_mib("--mem", "1024") == 1024 and cli.size_mib("--mem", "2G") == 2048
    with pytest.raises(UsageError, match="whole number of MiB"):
        cli.size_mib("--mem", "1536K")


# ---------------------------------------------------------------- memmap_value
@pytest.mark.parametrize("text,want", [("on", "1"), ("ON", "1"), ("off", "0"), (" off ", "0"),
                                       ("force", "force"), ("FORCE", "FORCE"), ("none", None), ("None", None),
                                       ("Y", "Y"), ("1", "1"), ("n", "n"), ("0", "0"), ("yes", "yes"),
                                       ("true", "true"), ("f", "f"), ("oN", "1"), ("OFF", "0"),
                                       ("Force", "Force")])   # kstrtobool: 'F' reads as N; 6.6+ ORACLE
def test_memmap_value(text, want):
    assert memmap_value(text) == want


@pytest.mark.parametrize("text", ["", "maybe", "on off", "y n", "x", "2", "o", "ox", "y=1", "1;reboot",
                                  "for ce", "y" * 17, "é", "-1"])
def test_memmap_value_refuses_what_the_kernel_would(text):
    with pytest.raises(UsageError, match="--memmap-on-memory"):
        memmap_value(text)


# ---------------------------------------------------------------- --append and the command line
def test_check_append_accepts_single_parameters():
    words = ["loglevel=8", "movable_node", "mem=4G", "a.b=c,d", "x='y'"]
    assert cli.check_append(words) == tuple(words)


@pytest.mark.parametrize("word,what", [("a b", "a space"), ('a="b c"', "a double quote"), ("a\tb", "control"),
                                       ("a\x01", "control"), ("a\x7f", "control"), ("caf\u00e9", "non-ASCII"),
                                       ("a\udcff", "non-ASCII"), ("", "empty"), ("--", "init")])
def test_check_append_refuses_what_splits_the_command_line(word, what):
    with pytest.raises(UsageError, match=what):
        cli.check_append(["ok=1", word])


def test_cmdline_length_limit_is_command_line_size():
    cli.check_cmdline_length("x" * (cli.COMMAND_LINE_SIZE - 1))
    with pytest.raises(UsageError, match="2048"):
        cli.check_cmdline_length("x" * cli.COMMAND_LINE_SIZE)


# ---------------------------------------------------------------- number limits, -k
@pytest.mark.parametrize("lo,hi,text,ok", [(1, 255, "1", True), (1, 255, "255", True), (1, 255, "0", False),
                                           (1, 255, "256", False), (1, 255, "-1", False), (1, 255, "two", False),
                                           (1, 255, "1.5", False), (1, 255, "", False)])
def test_int_in(lo, hi, text, ok):
    conv = cli.int_in("--cpus", lo, hi)
    if ok:
        assert conv(text) == int(text)
    else:
        with pytest.raises(UsageError, match="--cpus"):
            conv(text)


@pytest.mark.parametrize("text,ok", [("0.5", True), ("600", True), ("0", False), ("-1", False), ("nan", False),
                                     ("inf", False), ("1e9", False), ("soon", False)])
def test_seconds(text, ok):
    conv = cli.seconds("--timeout")
    if ok:
        assert conv(text) == float(text)
    else:
        with pytest.raises(UsageError, match="--timeout"):
            conv(text)


@pytest.mark.parametrize("expr", ["lifecycle", "remove or leak", "not numa and (a or b)", "-pNAME"])
def test_check_k_accepts_pytest_expressions(expr):
    assert cli.check_k(expr) == expr


@pytest.mark.parametrize("expr", ["", "  ", "and", "(", "a or", "a b", "not", "a)"])
def test_check_k_refuses_bad_expressions(expr):
    with pytest.raises(UsageError, match="-k"):
        cli.check_k(expr)


# ---------------------------------------------------------------- check_dimms
def test_check_dimms_accepts_block_multiples_quietly():
    assert check_dimms([128 * MiB, 1 << 30], slots=4, mem_mb=1024, maxmem_mb=8192) == []
    assert check_dimms([], slots=0, mem_mb=1024, maxmem_mb=1024) == []


def test_check_dimms_warns_on_sub_block_size():
    (w,) = check_dimms([130 * MiB], slots=4, mem_mb=1024, maxmem_mb=8192)
    assert "130 MiB" in w and "128 MiB memory block" in w


@pytest.mark.parametrize("sizes,slots,mem,maxmem,words", [
    ([128 * MiB] * 5, 4, 1024, 8192, "5 DIMMs requested but the machine has 4 slots"),
    ([MiB], 4, 1024, 8192, "not a multiple of 2 MiB"),
    ([0], 4, 1024, 8192, "not a multiple of 2 MiB"),
    ([4 << 30, 4 << 30], 4, 1024, 8192, "DIMMs total 8192 MiB but only 7168 MiB fit"),
    ([], 4, 2048, 1024, "below the base memory"),
])
def test_check_dimms_refuses(sizes, slots, mem, maxmem, words):
    with pytest.raises(UsageError, match=words):
        check_dimms(sizes, slots, mem, maxmem)


def test_check_dimms_exact_fit_is_fine():
    assert check_dimms([7 << 30], slots=1, mem_mb=1024, maxmem_mb=8192) == []


# ---------------------------------------------------------------- argparse wiring
def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_boot_defaults(monkeypatch):
    a = parse("boot")
    assert a.func is cli.cmd_boot
    assert (a.kernel, a.memmap_on_memory, a.default_state) == (None, "on", "offline")
    assert (a.mem, a.slots, a.maxmem, a.cpus, a.numa) == ("1024", 4, "8192", 2, 1)
    assert a.cmd == [] and a.dimm == [] and not a.dry_run


def test_abbreviated_options_are_refused():
    with pytest.raises(UsageError):
        parse("run", "--bis")


def test_boot_command_after_double_dash_is_kept_verbatim():
    a = parse("boot", "--kernel", "debian:6.1", "--memmap-on-memory", "off", "--", "sh", "-c", "exit 7")
    assert a.kernel == "debian:6.1" and a.memmap_on_memory == "off"
    assert a.cmd == ["--", "sh", "-c", "exit 7"]


def test_boot_repeatable_options():
    a = parse("boot", "--dimm", "128M", "--dimm", "1G", "--append", "a=1", "--append", "b=2",
              "--dry-run", "--numa", "2", "--dimm-node", "1")
    assert a.dimm == ["128M", "1G"] and a.append == ["a=1", "b=2"] and a.dry_run
    assert a.numa == 2 and a.dimm_node == 1


def test_run_and_bench_wiring():
    r = parse("run", "--kernel", "debian:6.12", "--json", "j.json", "--junit", "x.xml", "-k", "lifecycle",
              "--bisect")
    assert r.func is cli.cmd_run
    assert (r.kernel, r.json, r.junit, r.k, r.bisect) == (["debian:6.12"], "j.json", "x.xml", "lifecycle", True)
    assert parse("run", "--kernel", "debian:6.1", "--kernel", "debian:6.12").kernel == ["debian:6.1", "debian:6.12"]
    b = parse("bench", "--runs", "3", "--accel", "tcg")
    assert b.func is cli.cmd_bench and b.runs == 3 and b.accel == "tcg"
    assert parse("kernel", "fetch", "debian:6.1").func is cli.cmd_kernel_fetch


def test_accel_default_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MEMHP_ACCEL", "tcg")
    assert parse("boot").accel == "tcg"
    monkeypatch.delenv("MEMHP_ACCEL")
    assert parse("boot").accel == "auto"


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["boot", "--accel", "hvf"], ["bench", "--runs", "x"],
                                  ["kernel"], ["run", "--no-such-option"]])
def test_bad_command_lines_raise_usage_error(argv):
    with pytest.raises(UsageError):
        parse(*argv)


# ---------------------------------------------------------------- exit status of main()
@pytest.mark.parametrize("argv,words", [
    (["frobnicate"], "invalid choice"),
    (["boot", "--dimm", "3M"], "not a multiple of 2 MiB"),
    (["boot", "--dimm", "lots"], "bad size"),
    (["boot", "--mem", "1023"], "base memory"),
    (["boot", "--maxmem", "512"], "below the base memory"),
    (["boot", "--default-state", "sideways"], "memhp_default_state"),
    (["boot", "--memmap-on-memory", "on off"], "--memmap-on-memory"),
    (["boot", "--append", "a b"], "a space"),
    (["boot", "--numa", "2", "--dimm-node", "2"], "--dimm-node 2"),
    (["boot", "--kernel", "debian:6.12", "--patch", "x.patch"], "applies only to debian-src"),
    (["boot", "--kernel", "/no/such/bzImage", "--fragment", "f.config"], "applies only to debian-src"),
    (["bench", "--runs", "0"], "--runs 0"),
    (["run", "-k", "a b"], "not a valid expression"),
])
def test_main_usage_errors_exit_2_before_any_guest(argv, words, capsys, monkeypatch):
    def no_guest(*a, **k):
        raise AssertionError("a usage error must be caught before resolving a kernel")
    monkeypatch.setattr(cli, "_resolve", no_guest)
    assert cli.main(argv) == report.EXIT_USAGE == 2
    err = capsys.readouterr().err
    assert err.startswith("memhp: error: ") and words in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("exc,status", [
    (UsageError("bad"), 2),
    (KernelError("no such kernel"), 2),
    (CacheError("not writable"), 2),
    (QMPCommandError("device_add", "GenericError", "no free slots available"), 3),  # QEMU refused: INFRA
    (GuestCrash("panic", "Kernel panic - not syncing"), 1),
    (Hang("SSH on 127.0.0.1:1", timeout=60), 1),
    (InfraError("host"), 3),
    (VMLaunchFailure("QEMU exited", ["qemu"], 1, "boom"), 3),
    (HostToolMissing("qemu-system-x86_64 not found"), 3),   # the host's setup, not the user's input
    (HostCommandError("apt-get download failed", ["apt-get"], 100), 3),
    (PackageError("no candidate"), 3),
    (OSError(28, "No space left on device"), 3),
    (OSError(36, "File name too long"), 3),
    (KeyboardInterrupt(), 130),
])
def test_main_maps_errors_to_exit_status(exc, status, monkeypatch, capsys):
    def boom(args):
        raise exc
    monkeypatch.setattr(cli, "cmd_bench", boom)
    assert cli.main(["bench"]) == status == report.exit_for_error(exc)
    err = capsys.readouterr().err
    assert err.startswith("memhp: error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("exc", [KeyError("facts"), TypeError("unsupported operand"), ZeroDivisionError("x"),
                                 UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")])
def test_unexpected_exception_is_infra_with_traceback_in_a_log(exc, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MEMHP_CACHE", str(tmp_path))

    def boom(args):
        raise exc
    monkeypatch.setattr(cli, "cmd_bench", boom)
    assert cli.main(["bench"]) == report.EXIT_INFRA
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"memhp: error: {type(exc).__name__}: ") and "Traceback" not in err
    log = line.rsplit("traceback in ", 1)[1].rstrip(")")
    text = open(log).read()
    assert "Traceback (most recent call last)" in text and "in boom" in text and type(exc).__name__ in text


def test_main_returns_the_subcommand_status(monkeypatch):
    monkeypatch.setattr(cli, "cmd_bench", lambda args: 7)
    assert cli.main(["bench"]) == 7


# ---------------------------------------------------------------- run --bisect
@pytest.mark.parametrize("status,want", [(0, 0), (1, 1), (2, 128), (3, 125), (130, 130), (4, 125), (126, 125),
                                         (127, 125)])
def test_bisect_status_table(status, want):
    assert report.bisect_status(status) == want
    assert report.bisect_status(status) not in (126, 127)


@pytest.mark.parametrize("argv,want", [
    (["run", "--bisect"], True), (["run", "-k", "x", "--bisect"], True), (["run"], False),
    (["boot", "--bisect"], False), (["boot", "--", "run", "--bisect"], False), (["run", "--", "--bisect"], False),
])
def test_bisect_requested(argv, want):
    assert cli._bisect_requested(argv) is want


@pytest.mark.parametrize("argv,want", [
    (["run", "--bisect", "--no-such-option"], 128),
    (["run", "--bisect", "-k", "a b"], 128),
    (["run", "--bisect", "--kernel", "debian:6.12", "--patch", "p"], 128),
    (["run", "--bisect", "--json", "/proc/no/r.json"], 128),
])
def test_bisect_bad_input_aborts_git_bisect(argv, want, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_resolve", lambda args: pytest.fail("resolved a kernel on bad input"))
    assert cli.main(argv) == want
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


class _K:
    release, image, config = "6.12.0-test", None, None


def _fake_pytest(monkeypatch, outcome=None, rc=None, raise_exc=None, selected=1):
    """pytest.main replaced: the collection pass reports `selected` scenarios; the run pass writes
    one canned result to the path the RunOptions plugin object carries (never argv)."""
    import json

    import pytest as _pytest

    from harness.plugin import RunOptions

    def fake_main(pargs, plugins=()):
        opts = next(p for p in plugins if isinstance(p, RunOptions))
        if "--collect-only" in pargs:
            for p in plugins:
                if hasattr(p, "pytest_collection_finish"):
                    item = type("I", (), {"nodeid": "test_s.py::test_a", "name": "test_a",
                                          "module": type("M", (), {"__name__": "test_s"})})()
                    p.pytest_collection_finish(type("S", (), {"items": [item] * selected})())
            return 0 if selected else 5
        if raise_exc is not None:
            raise raise_exc
        assert not any(str(w).startswith("-k") or w == "--patch" for w in pargs), pargs
        if outcome is not None:
            with open(opts.results, "w") as f:
                json.dump([{"name": "s::a", "outcome": outcome}], f)
        return rc if rc is not None else (0 if outcome == "pass" else 1)
    monkeypatch.setattr(_pytest, "main", fake_main)
    monkeypatch.setattr(cli, "_resolve", lambda args: ("debian:6.12", _K(), None))
    monkeypatch.setattr(cli, "_need_qemu", lambda: None)


@pytest.mark.parametrize("outcome,plain,bisect", [("infra", 3, 125), ("fail", 1, 1), ("crash", 1, 1),
                                                  ("hang", 1, 1), ("pass", 0, 0), ("skip", 0, 0)])
def test_run_exit_status_from_the_results(outcome, plain, bisect, monkeypatch, tmp_path):
    _fake_pytest(monkeypatch, outcome)
    for flag, want in (([], plain), (["--bisect"], bisect)):
        art = tmp_path / f"{outcome}{len(flag)}"
        assert cli.main(["run", "--artifacts", str(art), *flag]) == want, (outcome, flag)


def test_run_infrastructure_paths_give_125_under_bisect(monkeypatch, tmp_path, capsys):
    # pytest could not start (no results), an unexpected exception, a report that cannot be written.
    _fake_pytest(monkeypatch, None, rc=3)
    assert cli.main(["run", "--bisect", "--artifacts", str(tmp_path / "a")]) == 125
    _fake_pytest(monkeypatch, raise_exc=KeyError("boom"))
    monkeypatch.setenv("MEMHP_CACHE", str(tmp_path / "cache"))
    assert cli.main(["run", "--bisect", "--artifacts", str(tmp_path / "b")]) == 125
    _fake_pytest(monkeypatch, "pass")
    out = tmp_path / "out"
    out.mkdir()
    real_write = report.write_doc

    def vanish(path, *a):  # the folder checked before the run is gone when the report is written
        if path.parent == out:
            raise OSError(2, "No such file or directory")
        return real_write(path, *a)
    monkeypatch.setattr(report, "write_doc", vanish)
    assert cli.main(["run", "--bisect", "--json", str(out / "r.json"), "--artifacts", str(tmp_path / "c")]) == 125
    errs = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("memhp: error:")]
    assert len(errs) == 3 and "could not write --json" in errs[2], errs


def test_run_no_scenario_matched_is_bad_input_before_any_kernel(monkeypatch, tmp_path, capsys):
    _fake_pytest(monkeypatch, "pass", selected=0)
    monkeypatch.setattr(cli, "_resolve", lambda args: pytest.fail("resolved a kernel with nothing to run"))
    assert cli.main(["run", "-k", "nothing_like_this"]) == 2
    assert cli.main(["run", "--bisect", "-k", "nothing_like_this"]) == 128
    assert "no scenario matched -k 'nothing_like_this'" in capsys.readouterr().err


# ---------------------------------------------------------------- the inner pytest gets no user argv
def test_run_options_reach_pytest_without_argv(tmp_path, monkeypatch):
    """A real inner pytest.main: a patch named -pNAME and a -k expression travel in RunOptions;
    pytest neither imports a module NAME nor reads them as options, and -k deselects as usual."""
    import json

    import pytest as _pytest

    from harness.plugin import RunOptions
    scen = tmp_path / "scen"
    scen.mkdir()
    (scen / "test_s.py").write_text(
        "import json, os\n"
        "def _rec(request, name):\n"
        "    with open(os.environ['REC'], 'a') as f:\n"
        "        f.write(json.dumps([name, request.config.getoption('patch'), request.config.getoption('kernel')]) + '\\n')\n"
        "def test_one(request):\n    _rec(request, 'one')\n"
        "def test_two(request):\n    _rec(request, 'two')\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-pNAME").write_text("--- a\n")
    rec = tmp_path / "rec.jsonl"
    monkeypatch.setenv("REC", str(rec))
    opts = RunOptions(kernel="debian-src:6.1", patches=("-pNAME",), keyword="one and not two")
    rc = _pytest.main(cli._pytest_argv(scen, "-q"), plugins=[opts])
    assert rc == 0
    rows = [json.loads(ln) for ln in rec.read_text().splitlines()]
    assert rows == [["one", ["-pNAME"], "debian-src:6.1"]]
    assert "NAME" not in __import__("sys").modules


def test_inner_pytest_refuses_a_patch_for_a_prebuilt_kernel(tmp_path):
    import pytest as _pytest

    from harness.plugin import RunOptions
    scen = tmp_path / "scen"
    scen.mkdir()
    (scen / "test_s.py").write_text("def test_one():\n    pass\n")
    p = tmp_path / "fix.patch"
    p.write_text("--- a\n")
    rc = _pytest.main(cli._pytest_argv(scen, "-q"), plugins=[RunOptions(kernel="debian:6.12", patches=(str(p),))])
    assert rc == _pytest.ExitCode.USAGE_ERROR


@pytest.mark.parametrize("outcome,want", [("pass", 125), ("infra", 125), ("fail", 1)])
def test_run_pytest_internal_error_is_infra_unless_the_kernel_failed(outcome, want, monkeypatch, tmp_path):
    _fake_pytest(monkeypatch, outcome, rc=3)   # pytest.ExitCode.INTERNAL_ERROR after some results
    assert cli.main(["run", "--bisect", "--artifacts", str(tmp_path / "a")]) == want


# ---------------------------------------------------------------- preflight: paths, kernel options
def test_output_checks_leave_nothing_behind(tmp_path):
    from harness.kernels.preflight import check_output_dir, check_output_file
    before = sorted(tmp_path.rglob("*"))
    check_output_file("--json", tmp_path / "r.json")
    check_output_dir("--artifacts", tmp_path / "a" / "b")
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("kind,make,words", [
    ("file", lambda t: t, "is a folder"),
    ("file", lambda t: t / "no" / "r.json", "does not exist"),
    ("file", lambda t: t / "f" / "r.json", "is not a folder"),
    ("file", lambda t: t / ("n" * 256), "File name too long"),
    ("file", lambda t: "", "empty path"),
    ("dir", lambda t: t / "f", "is a file"),
    ("dir", lambda t: t / "f" / "x", "is not a folder"),
    ("dir", lambda t: t / ("n" * 256) / "x", "File name too long"),
    ("dir", lambda t: "/proc/memhp-x", "cannot write"),
])
def test_output_checks_refuse(tmp_path, kind, make, words):
    from harness.kernels.preflight import check_output_dir, check_output_file
    (tmp_path / "f").write_text("")
    fn = check_output_file if kind == "file" else check_output_dir
    with pytest.raises(UsageError, match=words):
        fn("--x", make(tmp_path))


@pytest.mark.parametrize("spec,frag,patch,ok", [
    ("debian-src:6.1", [], ["P"], True), ("debian-src:6.1", ["P"], [], True), ("debian:6.12", [], [], True),
    ("debian:6.12", [], ["P"], False), ("debian:6.1", ["P"], [], False), ("/some/bzImage", [], ["P"], False),
    ("debian-src:6.1", [], ["MISSING"], False),
])
def test_check_kernel_options(tmp_path, spec, frag, patch, ok):
    from harness.kernels.preflight import check_kernel_options
    (tmp_path / "P").write_text("--- a\n")
    sub = lambda xs: [str(tmp_path / x) for x in xs]   # noqa: E731
    if ok:
        check_kernel_options(spec, sub(frag), sub(patch))
    else:
        with pytest.raises(UsageError):
            check_kernel_options(spec, sub(frag), sub(patch))
