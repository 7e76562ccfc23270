"""harness.cli without guests: size parsing, DIMM validation, argparse wiring, exit-status mapping.

The exit-status tests replace a subcommand's function with one that raises; everything
that boots a guest is in tests/integration/test_boot.py and test_run_e2e.py.
"""
from __future__ import annotations

import signal

import pytest

from harness import cli, report
from harness.cli import MiB, check_dimms, memmap_value, parse_size
from harness.errors import (CacheError, GuestCrash, Hang, HostToolMissing, InfraError, KernelError,
                            QMPCommandError, UsageError, VMLaunchFailure)


@pytest.fixture(autouse=True)
def _keep_sigterm():
    # cli.main() installs its own SIGTERM handler; give pytest its own back.
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------- parse_size
@pytest.mark.parametrize("text,want", [
    ("128M", 128 * MiB), ("128m", 128 * MiB), ("1G", 1 << 30), ("1g", 1 << 30), ("512MiB", 512 * MiB),
    ("2GiB", 2 << 30), ("64K", 64 << 10), ("1T", 1 << 40), (" 256M ", 256 * MiB), ("4MB", 4 * MiB),
    ("134217728", 134217728),           # a large bare number is bytes
    ("128", 128 * MiB),                 # a small bare number is MiB, as in QEMU's -m
    ("4095", 4095 * MiB), ("4096", 4096),
])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "M", "1.5G", "-1G", "12X", "1 G B", "one"])
def test_parse_size_rejects_with_a_usage_error(text):
    with pytest.raises(UsageError, match="bad size"):
        parse_size(text)


# ---------------------------------------------------------------- memmap_value
@pytest.mark.parametrize("text,want", [("on", "1"), ("ON", "1"), ("off", "0"), (" off ", "0"),
                                       ("force", "force"), ("none", None), ("None", None), ("Y", "Y"),
                                       ("1", "1")])
def test_memmap_value(text, want):
    assert memmap_value(text) == want


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
    assert (a.mem, a.slots, a.maxmem, a.cpus, a.numa) == (1024, 4, 8192, 2, 1)
    assert a.cmd == [] and a.dimm == [] and not a.dry_run


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
    assert (r.kernel, r.json, r.junit, r.k, r.bisect) == ("debian:6.12", "j.json", "x.xml", "lifecycle", True)
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
    (QMPCommandError("device_add", "GenericError", "no free slots available"), 2),
    (GuestCrash("panic", "Kernel panic - not syncing"), 1),
    (Hang("SSH on 127.0.0.1:1", timeout=60), 1),
    (InfraError("host"), 3),
    (VMLaunchFailure("QEMU exited", ["qemu"], 1, "boom"), 3),
    # HostToolMissing is both InfraError and UsageError; main() tests UsageError first, so a
    # missing host program is a one-line "fix your setup" exit 2, like any bad input.
    (HostToolMissing("qemu-system-x86_64 not found"), 2),
    (OSError(28, "No space left on device"), 3),
    (KeyboardInterrupt(), 130),
])
def test_main_maps_errors_to_exit_status(exc, status, monkeypatch, capsys):
    def boom(args):
        raise exc
    monkeypatch.setattr(cli, "cmd_bench", boom)
    assert cli.main(["bench"]) == status
    err = capsys.readouterr().err
    assert err.startswith("memhp: error: ") and "Traceback" not in err


def test_main_returns_the_subcommand_status(monkeypatch):
    monkeypatch.setattr(cli, "cmd_bench", lambda args: 7)
    assert cli.main(["bench"]) == 7


def test_bisect_turns_infra_into_125_only(monkeypatch, tmp_path):
    """cmd_run's own mapping, with pytest.main replaced by a writer of canned results."""
    import json

    import pytest as _pytest

    class K:
        release, image, config = "6.12.0-test", None, None

    monkeypatch.setattr(cli, "_resolve", lambda args: ("debian:6.12", K(), None))

    def fake_main(pargs, outcome):
        res = pargs[pargs.index("--memhp-results") + 1]
        with open(res, "w") as f:
            json.dump([{"name": "s::a", "outcome": outcome}], f)
        return 0 if outcome == "pass" else 1

    for outcome, plain, bisect in (("infra", 3, 125), ("fail", 1, 1), ("pass", 0, 0)):
        monkeypatch.setattr(_pytest, "main", lambda pargs, o=outcome: fake_main(pargs, o))
        for flag, want in (([], plain), (["--bisect"], bisect)):
            art = tmp_path / f"{outcome}{len(flag)}"
            assert cli.main(["run", "--artifacts", str(art), *flag]) == want, (outcome, flag)
