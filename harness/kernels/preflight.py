"""Before anything starts: are the options sane, and is this kernel fit for the hotplug suite?

Option checks (kernel options that cannot apply, input files, output paths) touch nothing: bad
input is exit 2 before a kernel is fetched or a guest boots. The kernel check reads its config
(beside the image, embedded IKCONFIG, or later /proc/config.gz in the guest) and says plainly
what is missing."""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

from harness.errors import KernelConfigError, UsageError
from harness.kernels.kconfig import memmap_blockers, missing_for_hotplug, parse_config


def check_config_text(config_text: Optional[str], where: str) -> List[str]:
    """Raise KernelConfigError when hotplug itself cannot work; return warnings otherwise."""
    if config_text is None:
        return [f"no kernel config found for {where} (not beside the image, no IKCONFIG); "
                f"running anyway, and /proc/config.gz is read after boot if the kernel has it"]
    cfg = parse_config(config_text)
    missing = missing_for_hotplug(cfg)
    if missing:
        raise KernelConfigError(f"{where}: the kernel config lacks {', '.join(missing)}; "
                                f"memory hot-add/remove cannot be tested")
    return [f"memmap_on_memory cannot apply on this kernel: {b}" for b in memmap_blockers(cfg)]


def check_kernel(kernel) -> List[str]:
    text = None
    if kernel.config:
        try:
            text = Path(kernel.config).read_text(errors="replace")
        except OSError:
            text = None
    if text is None:
        try:
            from harness.kernels.kernel import read_ikconfig
            text = read_ikconfig(Path(kernel.image))
        except Exception:
            text = None
    return check_config_text(text, str(kernel.image))


# ---------------------------------------------------------------- options, before anything starts
def kernel_scheme(spec: str) -> str:
    """'debian', 'debian-src', or 'path' (a bzImage or build folder)."""
    scheme, sep, _ = str(spec).strip().partition(":")
    return scheme if sep and scheme in ("debian", "debian-src") else "path"


def check_kernel_options(spec: str, fragments: Sequence[str] = (), patches: Sequence[str] = ()) -> None:
    """Raise UsageError for options that cannot apply to this kernel spec, or input files that
    cannot be read. Nothing is fetched: a silently ignored --patch would test the wrong kernel."""
    scheme = kernel_scheme(spec)
    for opt, values in (("--patch", patches), ("--fragment", fragments)):
        if values and scheme != "debian-src":
            what = "a prebuilt Debian kernel" if scheme == "debian" else "an already built kernel"
            raise UsageError(f"{opt} applies only to debian-src: specs, and {spec!r} is {what}; "
                             f"use --kernel debian-src:<ver>, or `memhp kernel build --tree DIR {opt} ...`")
        for v in values:
            check_input_file(opt, v)
    if scheme == "path":
        _stat_input("--kernel", spec, allow_missing=True)


def check_input_file(opt: str, value: str) -> None:
    """An input file given on the command line: it exists, is a regular file, can be read."""
    st = _stat_input(opt, value)
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{opt} {_show(value)}: is a folder, not a file")
    try:
        with open(value, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UsageError(f"{opt} {_show(value)}: cannot read: {e.strerror or e}") from None


def _stat_input(opt: str, value: str, allow_missing: bool = False) -> Optional[os.stat_result]:
    if not str(value):
        raise UsageError(f"{opt}: empty path")
    try:
        return os.stat(value)
    except FileNotFoundError:
        if allow_missing:
            return None
        raise UsageError(f"{opt} {_show(value)}: no such file") from None
    except OSError as e:  # ENAMETOOLONG, ENOTDIR, ELOOP, EACCES: the path itself is bad
        raise UsageError(f"{opt} {_show(value)}: {e.strerror or e}") from None


def _show(value) -> str:
    """A path or value for a one-line message: never a control character, never a bare surrogate."""
    text = str(value)
    if len(text) > 120:
        text = text[:60] + "..." + text[-40:]
    if any(0xdc80 <= ord(c) <= 0xdcff for c in text):  # bytes that were not UTF-8: show the bytes
        return repr(os.fsencode(text))[1:]
    return ascii(text) if any(not c.isprintable() or ord(c) > 0x7e for c in text) else repr(text)


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p):
        if p.parent == p:
            break
        p = p.parent
    return p


def _probe_dir(opt: str, value, folder: Path) -> None:
    """Create and remove a file in `folder`: the honest test of writability (root bypasses mode bits)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".memhp-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UsageError(f"{opt} {_show(value)}: cannot write in {_show(folder)}: {e.strerror or e}") from None


def _check_components(opt: str, value, path: Path, base: Path) -> None:
    """The parts of `path` below the existing `base` must fit NAME_MAX and the whole PATH_MAX."""
    if len(os.fsencode(str(path.absolute()))) >= 4096:
        raise UsageError(f"{opt} {_show(value)}: File name too long (over PATH_MAX, 4096 bytes)")
    limit = _name_max(base if base.is_dir() else base.parent)
    for part in path.relative_to(base).parts if base != path else ():
        if len(os.fsencode(part)) > limit:
            raise UsageError(f"{opt} {_show(value)}: File name too long ({len(os.fsencode(part))}-byte "
                             f"name, the limit is {limit})")


def check_output_file(opt: str, value) -> Path:
    """An output file (--json, --junit): its folder exists and is writable; it is not a folder,
    and if it exists it can be overwritten. Nothing is left behind by the check."""
    if not str(value):
        raise UsageError(f"{opt}: empty path")
    path = Path(value).absolute()
    parent = path.parent
    try:
        pst = os.stat(parent)
    except FileNotFoundError:
        raise UsageError(f"{opt} {_show(value)}: folder {_show(parent)} does not exist") from None
    except OSError as e:
        raise UsageError(f"{opt} {_show(value)}: {e.strerror or e}") from None
    if not stat.S_ISDIR(pst.st_mode):
        raise UsageError(f"{opt} {_show(value)}: {_show(parent)} is not a folder")
    _check_components(opt, value, path, parent)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UsageError(f"{opt} {_show(value)}: {e.strerror or e}") from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{opt} {_show(value)}: is a folder; give a file name")
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{opt} {_show(value)}: not a regular file")
        try:
            with open(path, "ab"):
                pass
        except OSError as e:
            raise UsageError(f"{opt} {_show(value)}: cannot write: {e.strerror or e}") from None
    else:
        _probe_dir(opt, value, parent)
    return path


def check_output_dir(opt: str, value) -> Path:
    """An output folder (--artifacts, --logs): a writable folder, or one that can be created
    under its nearest existing ancestor. Nothing is created by the check."""
    if not str(value):
        raise UsageError(f"{opt}: empty path")
    path = Path(value)
    try:
        base = _nearest_existing(path.absolute())
        st = os.stat(base)
    except OSError as e:
        raise UsageError(f"{opt} {_show(value)}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        what = "is a file, not a folder" if base == path.absolute() else f"{_show(base)} is not a folder"
        raise UsageError(f"{opt} {_show(value)}: {what}")
    _check_components(opt, value, path.absolute(), base)
    _probe_dir(opt, value, base)
    return path
