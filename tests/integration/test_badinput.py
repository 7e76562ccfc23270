"""Bad input: one error line on stderr, exit status 2, no traceback, no QEMU left behind.

Each case drives the real `memhp` command, as a user would. The DIMM size that is not a
multiple of the memory block is the exception: QEMU accepts it, so memhp warns and boots,
and the test checks that the guest kernel did refuse it, as the warning said.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "data" / "badinput"


def assert_bad_input(res, *words: str, progress_lines: int = 0) -> None:
    """`progress_lines`: how many "memhp: ..." progress lines may precede the error line."""
    assert res.rc == 2, f"bad input must exit 2\n{res}"
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res
    assert len(res.err_lines) == 1 + progress_lines, f"want exactly one error line on stderr\n{res}"
    assert all(ln.startswith("memhp: ") and "error" not in ln for ln in res.err_lines[:-1]), res
    line = res.err_lines[-1]
    assert line.startswith("memhp: error: "), line
    for w in words:
        assert w in line, f"{w!r} not in the error line: {line}"
    assert not res.qemus(), f"QEMU left running: {res.qemus()}"
    assert not list(res.tmpdir.glob("memhp-*")), "a run folder was made or left behind"
    print(f"{res.wall:.1f}s: {line}")


def test_missing_kernel_path(memhp_cli, tmp_path):
    res = memhp_cli(["boot", "--kernel", tmp_path / "no-such-bzImage", "--", "true"])
    assert_bad_input(res, "kernel not found", "no-such-bzImage")


@pytest.mark.parametrize("name", ["not-a-kernel.bin", "zeros-4k.bin"])
def test_not_a_kernel(memhp_cli, name):
    res = memhp_cli(["boot", "--kernel", DATA / name, "--", "true"])
    assert_bad_input(res, name, "is not a Linux kernel image")


def test_kernel_config_lacks_memory_hotplug(memhp_cli, memhp_kernel, tmp_path):
    """A real Debian bzImage beside a doctored config: preflight names the missing symbol."""
    assert memhp_kernel.config, "the Debian kernel comes with its config"
    cfg = Path(memhp_kernel.config).read_text()
    assert re.search(r"^CONFIG_MEMORY_HOTPLUG=y$", cfg, re.M), "the real config has MEMORY_HOTPLUG"
    folder = tmp_path / "no-hotplug-kernel"
    folder.mkdir()
    (folder / "bzImage").symlink_to(memhp_kernel.image)
    (folder / "config").write_text(re.sub(r"^CONFIG_MEMORY_HOTPLUG=y$", "# CONFIG_MEMORY_HOTPLUG is not set",
                                          cfg, flags=re.M))
    res = memhp_cli(["boot", "--kernel", folder, "--", "true"])
    assert_bad_input(res, "lacks", "CONFIG_MEMORY_HOTPLUG")


@pytest.mark.parametrize("spec,words", [
    ("debian:5.10", ("unknown kernel spec 'debian:5.10'", "debian:6.1", "debian:6.12")),
    ("foo:bar", ("unknown kernel spec scheme 'foo'", "debian:6.12")),
])
def test_unknown_spec(memhp_cli, spec, words):
    assert_bad_input(memhp_cli(["boot", "--kernel", spec, "--", "true"]), *words)


def test_dimm_not_multiple_of_2mib(memhp_cli, memhp_spec):
    res = memhp_cli(["boot", "--kernel", memhp_spec, "--dimm", "3M", "--", "true"])
    assert_bad_input(res, "not a multiple of 2 MiB", "0x200000")


def test_dimm_size_unparsable(memhp_cli, memhp_spec):
    assert_bad_input(memhp_cli(["boot", "--kernel", memhp_spec, "--dimm", "12Q", "--", "true"]), "bad size '12Q'")


def test_dimm_not_multiple_of_block_warns(memhp_cli, memhp_spec):
    """64 MiB: QEMU takes it, the guest refuses it. memhp warns first, then boots so a kernel
    developer can watch the refusal; the warning must be true, so the guest's dmesg is checked."""
    wait_and_show = ("i=0; while [ $i -lt 300 ] && ! dmesg | grep -q 'add_memory failed'; do "
                     "sleep 0.1; i=$((i+1)); done; dmesg | grep -E 'unaligned hotplug range|add_memory failed'")
    res = memhp_cli(["boot", "--kernel", memhp_spec, "--dimm", "64M", "--", wait_and_show], timeout=600)
    warnings = [ln for ln in res.err_lines if ln.startswith("memhp: warning: DIMM size")]
    assert len(warnings) == 1, res
    assert "64 MiB is not a multiple of the 128 MiB memory block" in warnings[0], warnings
    assert "Traceback" not in res.stderr, res
    assert res.rc == 0, f"the guest's dmesg lacks the refusal the warning predicted\n{res}"
    assert "unaligned hotplug range" in res.stdout and "add_memory failed" in res.stdout, res
    assert not res.qemus()


def test_more_dimms_than_slots(memhp_cli, memhp_spec):
    res = memhp_cli(["boot", "--kernel", memhp_spec, "--slots", "2"] + ["--dimm", "128M"] * 3 + ["--", "true"])
    assert_bad_input(res, "3 DIMMs requested", "2 slots")


def test_maxmem_below_base(memhp_cli, memhp_spec):
    res = memhp_cli(["boot", "--kernel", memhp_spec, "--mem", "2048", "--maxmem", "1024", "--", "true"])
    assert_bad_input(res, "--maxmem 1024M is below the base memory 2048M")


@pytest.mark.parametrize("cache", ["/proc/memhp-cache", "/etc/hostname/memhp-cache"],
                         ids=["under-proc", "file-as-folder"])
def test_unwritable_cache(memhp_cli, memhp_spec, cache):
    res = memhp_cli(["boot", "--kernel", memhp_spec, "--", "true"], env={"MEMHP_CACHE": cache})
    assert_bad_input(res, f"cache folder {cache} is not writable", "MEMHP_CACHE")


def test_impossible_default_state(memhp_cli, memhp_spec):
    res = memhp_cli(["boot", "--kernel", memhp_spec, "--default-state", "sideways", "--", "true"])
    assert_bad_input(res, "memhp_default_state must be one of", "'sideways'")


def test_qemu_not_installed(memhp_cli, memhp_spec, tmp_path):
    """PATH holds every host tool except qemu-system-*: the message names the Debian package."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").split(":"):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if not name.startswith("qemu-system") and not (bin_dir / name).exists():
                (bin_dir / name).symlink_to(Path(d) / name)
    res = memhp_cli(["boot", "--kernel", memhp_spec, "--", "true"], env={"PATH": str(bin_dir)})
    assert_bad_input(res, "qemu-system-x86_64 not found", "qemu-system-x86")


def test_unknown_option(memhp_cli):
    assert_bad_input(memhp_cli(["boot", "--frobnicate"]), "unrecognized arguments: --frobnicate")


def test_run_selects_no_scenario(memhp_cli, memhp_spec, tmp_path):
    res = memhp_cli(["run", "--kernel", memhp_spec, "-k", "no_such_scenario_xyz", "--artifacts", tmp_path])
    assert_bad_input(res, "no scenario matched", "no_such_scenario_xyz", progress_lines=1)


def test_run_scenarios_not_a_folder(memhp_cli, tmp_path):
    res = memhp_cli(["run", "--scenarios", tmp_path / "missing"])
    assert_bad_input(res, "--scenarios", "not a folder")
