"""Typed errors. Each carries the context a kernel developer needs to act on it.

Outcome mapping (report.classify and report.exit_for_error hold it, in one place): UsageError ->
exit 2; InfraError and subclasses (QEMU, the host, apt, the network) -> INFRA (exit 3); GuestCrash
-> CRASH; Hang -> HANG; CheckFailed, GuestCommandError, GuestRefused -> FAIL; anything else (a bug
in memhp) -> INFRA.
"""
from __future__ import annotations

from typing import Optional, Sequence


class HarnessError(Exception):
    """Base class for every error memhp raises on purpose."""


class UsageError(HarnessError):
    """Bad input from the user: one line, exit status 2, no traceback."""


class CacheError(UsageError):
    """The cache folder cannot be used (unwritable, full)."""


class KernelError(UsageError):
    """A kernel spec that cannot be resolved, or a file that is not a kernel."""


class KernelConfigError(UsageError):
    """The kernel's config lacks something memory hotplug needs."""


class InfraError(HarnessError):
    """QEMU or the host failed; not the kernel's fault."""


class HostToolMissing(InfraError):
    """A host program is missing. The message names the Debian package. The host's fault: INFRA."""


class KernelBuildError(InfraError):
    """A kernel build step failed; carries the log path."""

    def __init__(self, msg: str, log: Optional[str] = None):
        super().__init__(msg + (f" (log: {log})" if log else ""))
        self.log = log


class ConfigSymbolsDropped(UsageError):
    """Fragments asked for symbols that olddefconfig dropped."""

    def __init__(self, dropped: Sequence[tuple]):
        self.dropped = list(dropped)
        names = ", ".join(f"{sym} (asked {want!r}, got {got!r})" for sym, want, got in self.dropped)
        super().__init__(f"kconfig dropped requested symbols: {names}")


class PatchError(UsageError):
    """A patch did not apply; names the patch and the first rejected file/hunk."""


class VMLaunchFailure(InfraError):
    """QEMU exited or never became usable. Carries argv, exit code, output."""

    def __init__(self, msg: str, argv: Sequence[str] = (), exitcode: Optional[int] = None,
                 output: str = "", console_tail: str = ""):
        self.argv = list(argv)
        self.exitcode = exitcode
        self.output = output
        self.console_tail = console_tail
        detail = msg
        if exitcode is not None:
            detail += f" (exit code {exitcode})"
        if output.strip():
            detail += f": {output.strip().splitlines()[-1]}"
        super().__init__(detail)


class KVMBroken(VMLaunchFailure):
    """KVM is present but the guest produced no output or hit an emulation failure."""


class QMPError(InfraError):
    """QMP transport problem (socket closed, no greeting)."""


class QMPCommandError(InfraError):
    """QEMU refused a QMP command. error_class/desc are QEMU's own words.

    QEMU, not the guest kernel, decides these refusals, so an unexpected one is INFRA; scenarios
    that provoke a refusal on purpose catch it."""

    def __init__(self, command: str, error_class: str, desc: str, arguments: Optional[dict] = None):
        self.command = command
        self.error_class = error_class
        self.desc = desc
        self.arguments = arguments or {}
        super().__init__(f"{command}: {error_class}: {desc}")


class Hang(HarnessError):
    """A deadline ran out. Names what was awaited and what was last seen."""

    def __init__(self, awaited: str, last_seen: str = "", console_tail: str = "", timeout: float = 0):
        self.awaited = awaited
        self.last_seen = last_seen
        self.console_tail = console_tail
        self.timeout = timeout
        msg = f"timed out after {timeout:.1f}s waiting for {awaited}"
        if last_seen:
            msg += f"; last seen: {last_seen}"
        super().__init__(msg)


class GuestCrash(HarnessError):
    """The guest kernel panicked, Oopsed, BUGged or WARNed. Quotes the splat."""

    def __init__(self, kind: str, splat: str):
        self.kind = kind
        self.splat = splat
        first = splat.strip().splitlines()[0] if splat.strip() else kind
        super().__init__(f"guest {kind}: {first}")


class GuestCommandError(HarnessError):
    """A command in the guest failed where success was required."""

    def __init__(self, cmd: str, status: int, stdout: str, stderr: str):
        self.cmd, self.status, self.stdout, self.stderr = cmd, status, stdout, stderr
        super().__init__(f"guest command {cmd!r} exited {status}: {(stderr or stdout).strip()[-300:]}")


class GuestRefused(HarnessError):
    """The guest kernel refused a hotplug request (e.g. unaligned range, busy offline)."""


class CheckFailed(HarnessError):
    """A check did not hold: expected vs observed and the rule that links them."""

    def __init__(self, name: str, expected, observed, rule: str):
        self.name, self.expected, self.observed, self.rule = name, expected, observed, rule
        super().__init__(f"{name}: expected {expected!r}, observed {observed!r} ({rule})")


class HostCommandError(InfraError):
    """A host program (apt, dpkg, tar, git, make) failed or timed out; carries argv and output."""

    def __init__(self, msg: str, argv: Sequence[str] = (), exitcode: Optional[int] = None, output: str = ""):
        self.argv = list(argv)
        self.exitcode = exitcode
        self.output = output
        super().__init__(msg)


class HostCommandTimeout(HostCommandError):
    """A host program ran past its deadline; its whole process group was killed."""


class PackageError(InfraError):
    """apt cannot provide a package, or a downloaded .deb does not match what apt announced."""
