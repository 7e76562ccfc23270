"""Bad input: one error line on stderr, exit status 2, no traceback, no QEMU, nothing cached.

Each case drives the real `memhp` command, as a user would. BAD_INPUTS is the table: every row
runs with MEMHP_CACHE pointing at an empty folder, which must stay empty, so each check is seen
to happen before anything is fetched, built or booted (no row boots a guest). The DIMM size that
is not a multiple of the memory block is the exception: QEMU accepts it, so memhp warns and
boots, and the test checks that the guest kernel did refuse it, as the warning said. A missing
host program is the host's fault, not bad input: exit 3, still one line, still before any fetch.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "data" / "badinput"
NON_UTF8 = os.fsdecode(b"mem=\xff\xfe")      # argv bytes that are not UTF-8


def assert_bad_input(res, *words: str, progress_lines: int = 0, rc: int = 2) -> None:
    """`progress_lines`: how many "memhp: ..." progress lines may precede the error line."""
    assert res.rc == rc, f"bad input must exit {rc}\n{res}"
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


def cache_files(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# (id, argv, words in the error line). {tmp}: a fresh folder holding the files below; {data}: DATA.
BAD_INPUTS = [
    # kernel specs and kernel files
    ("kernel-missing-path", ["boot", "--kernel", "{tmp}/no-such-bzImage", "--", "true"], ["kernel not found", "no-such-bzImage"]),
    ("kernel-text-file", ["boot", "--kernel", "{data}/not-a-kernel.bin", "--", "true"], ["not-a-kernel.bin", "is not a Linux kernel image"]),
    ("kernel-zeros", ["boot", "--kernel", "{data}/zeros-4k.bin", "--", "true"], ["zeros-4k.bin", "is not a Linux kernel image"]),
    ("kernel-empty-folder", ["boot", "--kernel", "{tmp}/empty", "--", "true"], ["kernel not found", "has no bzImage"]),
    ("kernel-debian-5.10", ["boot", "--kernel", "debian:5.10", "--", "true"], ["unknown kernel spec 'debian:5.10'", "debian:6.12"]),
    ("kernel-debian-src-5.10", ["run", "--kernel", "debian-src:5.10"], ["debian-src:5.10"]),
    ("kernel-scheme", ["boot", "--kernel", "foo:bar", "--", "true"], ["unknown kernel spec scheme 'foo'", "debian:6.12"]),
    ("kernel-empty", ["boot", "--kernel", "", "--", "true"], ["--kernel: empty kernel spec"]),
    ("kernel-name-too-long", ["boot", "--kernel", "{tmp}/" + "k" * 300, "--", "true"], ["--kernel", "File name too long"]),
    ("kernel-fetch-scheme", ["kernel", "fetch", "foo:bar"], ["unknown kernel spec scheme 'foo'"]),
    ("kernel-fetch-5.10", ["kernel", "fetch", "debian:5.10"], ["unknown kernel spec 'debian:5.10'"]),
    # options that cannot apply to the chosen kernel
    ("patch-debian-run", ["run", "--kernel", "debian:6.12", "--patch", "{tmp}/fix.patch"], ["--patch applies only to debian-src", "'debian:6.12'"]),
    ("patch-debian-boot", ["boot", "--kernel", "debian:6.1", "--patch", "{tmp}/fix.patch", "--", "true"], ["--patch applies only to debian-src"]),
    ("patch-default-spec", ["bench", "--patch", "{tmp}/fix.patch"], ["--patch applies only to debian-src", "debian:6.12"]),
    ("fragment-debian", ["run", "--kernel", "debian:6.1", "--fragment", "{tmp}/extra.config"], ["--fragment applies only to debian-src"]),
    ("fragment-path-kernel", ["run", "--kernel", "{data}/zeros-4k.bin", "--fragment", "{tmp}/extra.config"], ["--fragment applies only to debian-src", "already built"]),
    ("patch-missing-file", ["run", "--kernel", "debian-src:6.1", "--patch", "{tmp}/missing.patch"], ["--patch", "missing.patch", "no such file"]),
    ("patch-looks-like-an-option", ["run", "--kernel", "debian-src:6.1", "--patch=-pNAME"], ["--patch '-pNAME': no such file"]),
    ("fragment-is-a-folder", ["run", "--kernel", "debian-src:6.1", "--fragment", "{tmp}/empty"], ["--fragment", "is a folder"]),
    ("build-tree-missing", ["kernel", "build", "--tree", "{tmp}/no-tree"], ["--tree", "no such file"]),
    ("build-tree-not-kernel", ["kernel", "build", "--tree", "{tmp}/empty"], ["--tree", "not a kernel source tree"]),
    ("build-jobs-0", ["kernel", "build", "--tree", "{tmp}/empty", "--jobs", "0"], ["--jobs 0"]),
    ("build-base", ["kernel", "build", "--tree", "{tmp}/empty", "--base", "allyesconfig"], ["invalid choice: 'allyesconfig'"]),
    ("build-patch-missing", ["kernel", "build", "--tree", "{tmp}/tree", "--patch", "{tmp}/missing.patch"], ["--patch", "no such file"]),
    # -k and the scenario folder
    ("k-no-match", ["run", "-k", "no_such_scenario_xyz"], ["no scenario matched", "no_such_scenario_xyz"]),
    ("k-syntax-and", ["run", "-k", "and"], ["-k 'and'", "not a valid expression"]),
    ("k-syntax-paren", ["run", "-k", "(remove"], ["not a valid expression"]),
    ("k-two-words", ["run", "-k", "remove leak"], ["not a valid expression"]),
    ("k-empty", ["run", "-k", ""], ["-k: empty expression"]),
    ("scenarios-missing", ["run", "--scenarios", "{tmp}/missing"], ["--scenarios", "not a folder"]),
    ("scenarios-file", ["run", "--scenarios", "{tmp}/fix.patch"], ["--scenarios", "not a folder"]),
    # output paths, checked before the run
    ("json-under-proc", ["run", "--json", "/proc/memhp-r.json"], ["--json '/proc/memhp-r.json'", "cannot write"]),
    ("json-is-folder", ["run", "--json", "{tmp}/empty"], ["--json", "is a folder"]),
    ("json-no-parent", ["run", "--json", "{tmp}/no/such/r.json"], ["--json", "does not exist"]),
    ("json-file-as-folder", ["run", "--json", "{tmp}/fix.patch/r.json"], ["--json", "is not a folder"]),
    ("json-name-too-long", ["run", "--json", "{tmp}/" + "j" * 300 + ".json"], ["--json", "File name too long"]),
    ("json-empty", ["run", "--json", ""], ["--json: empty path"]),
    ("junit-under-sys", ["run", "--junit", "/sys/memhp-r.xml"], ["--junit", "cannot write"]),
    ("json-junit-same", ["run", "--json", "{tmp}/r.out", "--junit", "{tmp}/r.out"], ["--json and --junit name the same file"]),
    ("artifacts-under-proc", ["run", "--artifacts", "/proc/memhp-art"], ["--artifacts", "cannot write"]),
    ("artifacts-is-file", ["run", "--artifacts", "{tmp}/fix.patch"], ["--artifacts", "is a file"]),
    ("artifacts-name-too-long", ["run", "--artifacts", "{tmp}/" + "a" * 300], ["--artifacts", "File name too long"]),
    ("logs-under-file", ["boot", "--logs", "{tmp}/fix.patch/logs", "--", "true"], ["--logs", "is not a folder"]),
    ("logs-under-proc", ["boot", "--logs", "/proc/memhp-logs", "--", "true"], ["--logs", "cannot write"]),
    # --memmap-on-memory: only what the kernel's parser takes, never a second parameter
    ("memmap-two-words", ["boot", "--memmap-on-memory", "on memhp_default_state=online", "--", "true"], ["--memmap-on-memory", "the kernel would refuse it"]),
    ("memmap-maybe", ["boot", "--memmap-on-memory", "maybe", "--", "true"], ["--memmap-on-memory 'maybe'"]),
    ("memmap-empty", ["boot", "--memmap-on-memory", "", "--", "true"], ["--memmap-on-memory ''"]),
    ("memmap-equals", ["boot", "--memmap-on-memory", "y=1", "--", "true"], ["--memmap-on-memory 'y=1'"]),
    ("memmap-2", ["boot", "--memmap-on-memory", "2", "--", "true"], ["--memmap-on-memory '2'"]),
    # --append: one printable parameter each, and the whole line under COMMAND_LINE_SIZE
    ("append-space", ["boot", "--append", "quiet loglevel=8", "--", "true"], ["a space"]),
    ("append-quote", ["boot", "--append", 'dyndbg="file mm/* +p"', "--", "true"], ["a double quote"]),
    ("append-tab", ["boot", "--append", "a\tb", "--", "true"], ["control character"]),
    ("append-control", ["boot", "--append", "a\x01b", "--", "true"], ["control character"]),
    ("append-non-ascii", ["boot", "--append", "caf\u00e9=1", "--", "true"], ["non-ASCII"]),
    ("append-non-utf8", ["boot", "--append", NON_UTF8, "--", "true"], ["non-ASCII"]),
    ("append-empty", ["boot", "--append", "", "--", "true"], ["empty kernel parameter"]),
    ("append-newline", ["boot", "--append", "a=1\ninit=/bin/sh", "--", "true"], ["control character"]),
    ("append-too-long", ["boot", "--append", "x=" + "y" * 2100, "--", "true"], ["kernel command line is", "2047"]),
    ("append-too-long-total", ["boot"] + ["--append", "p=" + "z" * 190] * 11 + ["--", "true"], ["kernel command line is", "2047"]),
    # sizes: one unit rule (a bare number is MiB)
    ("dimm-3M", ["boot", "--dimm", "3M", "--", "true"], ["not a multiple of 2 MiB", "0x200000"]),
    ("dimm-12Q", ["boot", "--dimm", "12Q", "--", "true"], ["bad size '12Q'"]),
    ("dimm-fraction", ["boot", "--dimm", "1.5G", "--", "true"], ["bad size '1.5G'"]),
    ("dimm-zero", ["boot", "--dimm", "0", "--", "true"], ["not a multiple of 2 MiB"]),
    ("dimm-too-many", ["boot", "--slots", "2"] + ["--dimm", "128M"] * 3 + ["--", "true"], ["3 DIMMs requested", "2 slots"]),
    ("dimm-over-maxmem", ["boot", "--dimm", "8G", "--", "true"], ["DIMMs total 8192 MiB"]),
    ("virtio-mem-not-block-multiple", ["boot", "--virtio-mem", "1023M", "--", "true"], ["virtio-mem size 1023 MiB", "not a multiple of its block-size"]),
    ("virtio-mem-block-not-pow2", ["boot", "--virtio-mem", "1G,block-size=3M", "--", "true"], ["block-size 3072 KiB", "not a power of two"]),
    ("virtio-mem-block-below-page", ["boot", "--virtio-mem", "1G,block-size=2K", "--", "true"], ["block-size 2 KiB", "page size is 4 KiB"]),
    ("virtio-mem-block-below-qemu-min", ["boot", "--virtio-mem", "1G,block-size=512K", "--", "true"], ["block-size 512 KiB", "minimum of 1 MiB"]),
    ("virtio-mem-over-maxmem", ["boot", "--virtio-mem", "8G", "--", "true"], ["virtio-mem size 8192 MiB", "does not fit under maxmem"]),
    ("maxmem-below-base", ["boot", "--mem", "2048", "--maxmem", "1024", "--", "true"], ["--maxmem 1024M is below the base memory 2048M"]),
    ("maxmem-over-1T", ["boot", "--maxmem", "2T", "--", "true"], ["--maxmem 2T", "1 TiB"]),
    ("mem-zero", ["boot", "--mem", "0", "--", "true"], ["base memory"]),
    ("mem-odd", ["boot", "--mem", "1023", "--", "true"], ["base memory"]),
    ("mem-not-mib", ["boot", "--mem", "1536K", "--", "true"], ["--mem 1536K: not a whole number of MiB"]),
    ("mem-word", ["boot", "--mem", "lots", "--", "true"], ["bad size 'lots'"]),
    # machine limits
    ("cpus-0", ["boot", "--cpus", "0", "--", "true"], ["--cpus 0: must be 1..255"]),
    ("cpus-256", ["boot", "--cpus", "256", "--", "true"], ["--cpus 256: must be 1..255"]),
    ("cpus-word", ["boot", "--cpus", "two", "--", "true"], ["--cpus 'two': not a whole number"]),
    ("numa-0", ["boot", "--numa", "0", "--", "true"], ["--numa 0: must be 1..128"]),
    ("numa-129", ["boot", "--numa", "129", "--", "true"], ["--numa 129"]),
    ("dimm-node-not-below-numa", ["boot", "--numa", "2", "--dimm-node", "2", "--dimm", "128M", "--", "true"], ["--dimm-node 2", "nodes 0..1"]),
    ("dimm-node-negative", ["boot", "--dimm-node", "-1", "--", "true"], ["--dimm-node -1"]),
    ("slots-300", ["boot", "--slots", "300", "--", "true"], ["--slots 300: must be 0..256"]),
    ("timeout-0", ["boot", "--timeout", "0", "--", "true"], ["--timeout '0'"]),
    ("timeout-negative", ["boot", "--timeout", "-5", "--", "true"], ["--timeout '-5'"]),
    ("timeout-nan", ["boot", "--timeout", "nan", "--", "true"], ["--timeout 'nan'"]),
    ("timeout-inf", ["boot", "--timeout", "inf", "--", "true"], ["--timeout 'inf'"]),
    ("runs-0", ["bench", "--runs", "0"], ["--runs 0: must be 1..1000"]),
    ("runs-negative", ["bench", "--runs", "-3"], ["--runs -3"]),
    ("default-state", ["boot", "--default-state", "sideways", "--", "true"], ["memhp_default_state must be one of", "'sideways'"]),
    ("accel", ["boot", "--accel", "hvf", "--", "true"], ["invalid choice: 'hvf'"]),
    # the command line itself
    ("unknown-option", ["boot", "--frobnicate"], ["unrecognized arguments: --frobnicate"]),
    ("abbreviated-option", ["run", "--bis"], ["unrecognized arguments: --bis"]),
    ("unknown-command", ["frobnicate"], ["invalid choice: 'frobnicate'"]),
    ("no-command", [], ["required: command"]),
    ("kernel-no-subcommand", ["kernel"], ["required: kcommand"]),
]


@pytest.fixture(scope="module")
def bad_input_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("badinput")
    (tmp / "empty").mkdir()
    (tmp / "tree").mkdir()
    (tmp / "tree" / "Makefile").write_text("# not really a kernel tree\n")
    (tmp / "fix.patch").write_text("--- a/x\n+++ b/x\n")
    (tmp / "extra.config").write_text("CONFIG_DEBUG_VM=y\n")
    return tmp


def test_bad_input_table_is_big_enough():
    assert len(BAD_INPUTS) >= 60 and len({r[0] for r in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize("argv,words", [r[1:] for r in BAD_INPUTS], ids=[r[0] for r in BAD_INPUTS])
def test_bad_input(memhp_cli, bad_input_files, tmp_path, argv, words):
    """Exit 2, one line, no traceback, no QEMU, and the (empty) cache stays empty."""
    cache = tmp_path / "cache"
    cache.mkdir()
    args = [a.replace("{tmp}", str(bad_input_files)).replace("{data}", str(DATA)) for a in argv]
    res = memhp_cli(args, env={"MEMHP_CACHE": str(cache)}, timeout=120)
    assert_bad_input(res, *words)
    assert cache_files(cache) == [], f"bad input wrote into the cache: {cache_files(cache)}"


@pytest.mark.parametrize("argv,rc", [
    (["run", "--bisect", "-k", "and"], 128),
    (["run", "--bisect", "--kernel", "debian:6.12", "--patch", "{tmp}/fix.patch"], 128),
    (["run", "--bisect", "--json", "/proc/memhp-r.json"], 128),
    (["run", "--bisect", "--frobnicate"], 128),
    (["run", "-k", "and"], 2),
])
def test_bisect_bad_input_aborts_git_bisect(memhp_cli, bad_input_files, tmp_path, argv, rc):
    """git bisect run aborts on 128; bad input must never be read as a bad commit."""
    cache = tmp_path / "cache"
    cache.mkdir()
    res = memhp_cli([a.replace("{tmp}", str(bad_input_files)) for a in argv], env={"MEMHP_CACHE": str(cache)})
    assert_bad_input(res, rc=rc)
    assert cache_files(cache) == []


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
    cache = tmp_path / "cache"
    cache.mkdir()
    res = memhp_cli(["boot", "--kernel", folder, "--", "true"], env={"MEMHP_CACHE": str(cache)})
    assert_bad_input(res, "lacks", "CONFIG_MEMORY_HOTPLUG")
    assert cache_files(cache) == [], "the config check must come before any image is built"


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


@pytest.mark.parametrize("cache", ["/proc/memhp-cache", "/etc/hostname/memhp-cache"],
                         ids=["under-proc", "file-as-folder"])
def test_unwritable_cache(memhp_cli, memhp_spec, cache):
    res = memhp_cli(["boot", "--kernel", memhp_spec, "--", "true"], env={"MEMHP_CACHE": cache})
    assert_bad_input(res, f"cache folder {cache} is not writable", "MEMHP_CACHE")


@pytest.mark.parametrize("command", [["boot", "--", "true"], ["run"], ["bench", "--runs", "1"],
                                     ["run", "--bisect"]], ids=["boot", "run", "bench", "run-bisect"])
def test_qemu_not_installed_is_infra_before_any_fetch(memhp_cli, tmp_path, command):
    """PATH holds every host tool except qemu-system-*: the host's fault, so INFRA (exit 3; 125
    under --bisect), one line naming the Debian package, before any kernel is fetched."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").split(":"):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if not name.startswith("qemu-system") and not (bin_dir / name).exists():
                (bin_dir / name).symlink_to(Path(d) / name)
    cache = tmp_path / "cache"
    cache.mkdir()
    res = memhp_cli(command, env={"PATH": str(bin_dir), "MEMHP_CACHE": str(cache)})
    assert_bad_input(res, "qemu-system-x86_64 not found", "qemu-system-x86",
                     rc=125 if "--bisect" in command else 3)
    assert cache_files(cache) == []
