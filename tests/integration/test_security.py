"""Never leak: the guest is reachable from this host's loopback only and reaches nothing; run
folders, QMP sockets and keys are private; user strings never reach a shell unquoted; the guest
takes no password.
"""
from __future__ import annotations

import ast
import os
import re
import shlex
import socket
import stat
import time
from pathlib import Path
from typing import Dict, List, Optional

import paramiko
import pytest

HARNESS = Path(__file__).resolve().parents[2] / "harness"


# ---------------------------------------------------------------- network
def _listeners(pid: int, port: int) -> List[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on `port` in QEMU's network namespace."""
    out = []
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            addr, p = f[1].rsplit(":", 1)
            if int(p, 16) == port and f[3] == "0A":
                out.append(f"{name}:{addr}")
    return out


def _host_addresses() -> List[str]:
    """This host's non-loopback IPv4 addresses, from /proc/net/fib_trie (no tool needed)."""
    addrs, lines = set(), Path("/proc/net/fib_trie").read_text().splitlines()
    for prev, ln in zip(lines, lines[1:]):
        if "/32 host LOCAL" in ln:
            a = prev.split()[-1]
            if not a.startswith("127."):
                addrs.add(a)
    return sorted(addrs)


def test_ssh_forward_loopback_only_and_guest_net_restricted(boot):
    vm = boot()
    argv = vm.machine.argv
    nics = [argv[i + 1] for i, a in enumerate(argv) if a in ("-nic", "-netdev", "-net")]
    assert len(nics) == 1, f"exactly one guest network, got {nics}"
    opts = nics[0].split(",")
    assert "restrict=on" in opts, nics[0]
    fwds = [o for o in opts if o.startswith("hostfwd=")]
    assert fwds == [f"hostfwd=tcp:127.0.0.1:{vm.machine.runtime.ssh_port}-:22"], fwds
    assert not [o for o in opts if o.startswith("guestfwd=")], nics[0]
    # What the kernel says: the forward listens on 127.0.0.1 only.
    listening = _listeners(vm.machine.pid, vm.machine.runtime.ssh_port)
    assert listening == ["tcp:0100007F"], f"port {vm.machine.runtime.ssh_port} listens on {listening}"
    for addr in _host_addresses():
        with socket.socket() as s:
            s.settimeout(3)
            assert s.connect_ex((addr, vm.machine.runtime.ssh_port)) != 0, f"SSH forward reachable on {addr}"
    # restrict=on: the guest cannot open a connection to the host (10.0.2.2 is the host's loopback).
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        srv.settimeout(0)
        port = srv.getsockname()[1]
        res = vm.run(f"echo hello | nc -w 2 10.0.2.2 {port}; echo nc-exit=$?", timeout=60)
        assert "nc-exit=" in res.stdout, res
        with pytest.raises(BlockingIOError):
            srv.accept()


# ---------------------------------------------------------------- files
def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_run_folder_qmp_socket_and_keys_private(boot):
    vm = boot()
    run_dir = vm.machine.runtime.run_dir
    assert run_dir.is_dir() and oct(_mode(run_dir)) == oct(0o700), f"{run_dir}: {oct(_mode(run_dir))}"
    assert vm.machine.runtime.qmp_socket.parent == run_dir and stat.S_ISSOCK(os.stat(vm.machine.runtime.qmp_socket).st_mode)
    assert vm.machine.runtime.console_socket.parent == run_dir
    key = Path(vm.image.ssh_key)
    assert oct(_mode(key)) == oct(0o600), f"{key}: {oct(_mode(key))}"
    # Nobody but the owner can reach the sockets: the folder's mode is the gate; check it is ours.
    assert os.stat(run_dir).st_uid == os.getuid()


# ---------------------------------------------------------------- shells
# A small taint check. Sources: parameters annotated str or Path (what callers, and through
# them users, hand in: paths, values, specs). Sanitisers: shlex.quote (or a local alias),
# shlex.join, and numeric conversions. Sinks: the command string of a guest .run/.run_bytes,
# and of any call with shell=True. A wrapper passing its own parameter straight on (Guest.run
# -> SSH.run) is not a sink: its callers are checked instead.
QUOTERS = {"quote", "_q"}
NUMERIC = {"int", "len", "hex", "oct", "round", "float", "bool"}
STRISH = re.compile(r"\b(str|Path|PathLike|AnyStr|PurePath)\b")


def _name(node) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


class _Scope:
    """One function: its parameters' annotations, and every expression bound to a local name
    (assignments, and the iterables of loop and comprehension variables)."""

    def __init__(self, fn):
        self.params: Dict[str, str] = {}
        self.binds: Dict[str, List[ast.AST]] = {}
        self.loop_vars: set = set()    # bound to an element of their iterable, not to it
        if fn is None:
            return
        a = fn.args
        for arg in a.posonlyargs + a.args + a.kwonlyargs:
            self.params[arg.arg] = ast.unparse(arg.annotation) if arg.annotation else ""
        for node in ast.walk(fn):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name) and node.value is not None:
                            self.binds.setdefault(n.id, []).append(node.value)
            elif isinstance(node, (ast.For, ast.comprehension)):
                for n in ast.walk(node.target):
                    if isinstance(n, ast.Name):
                        self.binds.setdefault(n.id, []).append(node.iter)
                        self.loop_vars.add(n.id)


def tainted(expr, sc: _Scope, seen=frozenset()) -> bool:
    """Can `expr` carry a caller's string into a shell command unquoted?"""
    if isinstance(expr, ast.Constant):
        return False
    if isinstance(expr, ast.Name):
        if expr.id in sc.params and expr.id not in sc.binds:
            return bool(STRISH.search(sc.params[expr.id]))
        if expr.id in seen:
            return False
        return any(tainted(v, sc, seen | {expr.id}) for v in sc.binds.get(expr.id, []))
    if isinstance(expr, ast.Call):
        f = _name(expr.func)
        if f in QUOTERS or f in NUMERIC or (f == "join" and _name(getattr(expr.func, "value", None)) == "shlex"):
            return False
    if isinstance(expr, ast.FormattedValue) and expr.format_spec is not None \
            and re.search(r"[dxXob]$", ast.unparse(expr.format_spec).strip("'\"")):
        return False  # numeric formatting (:d, :x, :08x)
    return any(tainted(ch, sc, seen) for ch in ast.iter_child_nodes(expr) if not isinstance(ch, ast.expr_context))


def _is_argv(expr, sc: _Scope) -> bool:
    """A list or tuple display, a concatenation with one, or a local name bound only to such values:
    an argv handed to exec, which no shell parses (a str command is never a list)."""
    if isinstance(expr, (ast.List, ast.Tuple)):
        return True
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
        return _is_argv(expr.left, sc) or _is_argv(expr.right, sc)
    if isinstance(expr, ast.Name) and expr.id in sc.binds and expr.id not in sc.params and expr.id not in sc.loop_vars:
        return all(isinstance(v, (ast.List, ast.Tuple)) for v in sc.binds[expr.id])
    return False


def shell_command_findings(root: Path = HARNESS) -> List[str]:
    """Shell commands (guest .run/.run_bytes strings, shell=True) with a caller's string in them unquoted."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        parents = {ch: node for node in ast.walk(tree) for ch in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            shell = any(k.arg == "shell" and isinstance(k.value, ast.Constant) and k.value.value is True
                        for k in node.keywords)
            guest_cmd = isinstance(node.func, ast.Attribute) and node.func.attr in ("run", "run_bytes") \
                and _name(node.func.value) != "subprocess"
            if not (shell or guest_cmd):
                continue
            fn = node
            while fn is not None and not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                fn = parents.get(fn)
            sc = _Scope(fn)
            arg = node.args[0]
            if not shell and isinstance(arg, ast.Name) and arg.id in sc.params:
                continue   # a wrapper handing its caller's command on
            if not shell and _is_argv(arg, sc):
                continue   # an argv list (make + [...], or a name bound only to lists): no shell parses it
            if tainted(arg, sc):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno}: "
                             f"{'shell=True' if shell else 'guest command'}: {ast.unparse(arg)[:120]}")
    return found


def test_no_unquoted_user_strings_in_shell_commands():
    findings = shell_command_findings()
    assert not findings, "unquoted values in shell commands:\n" + "\n".join(findings)


def test_the_check_catches_unquoted_input(tmp_path):
    """The AST check must be able to fail: a planted unquoted command is found, a quoted one not."""
    (tmp_path / "bad.py").write_text(
        "import shlex, subprocess\n"
        "def f(guest, path: str, where: Path, n: int, ids):\n"
        "    guest.run(f'cat {path}')\n"
        "    cmd = 'rm -rf ' + str(where) + '/x'\n"
        "    subprocess.run(cmd, shell=True)\n"
        "    guest.run(f'cat {shlex.quote(path)} /x/{n} ' + ' '.join(str(i) for i in ids))\n"
        "    for p in [path]:\n"
        "        guest.run_bytes('dd if=' + p)\n"
        "    guest.run(path)\n"
        "    argv = ['patch', '-i', str(where)]\n"
        "    host.run(argv)\n"
        "    line = 'patch -i ' + str(where)\n"
        "    host.run(line)\n")
    found = shell_command_findings(tmp_path)
    assert sorted(int(ln.split(":")[1]) for ln in found) == [3, 5, 8, 13], found


def test_guest_write_is_literal(boot):
    """Guest.write quotes: a value with shell syntax is written verbatim and runs nothing."""
    vm = boot()
    value = "x; touch /tmp/pwned; $(touch /tmp/pwned2) `touch /tmp/pwned3` 'q\" \\n"
    path = "/tmp/out file;touch pwned4 $(touch pwned5)"
    vm.guest.write(path, value).check()
    assert vm.guest.read(path) == value + "\n"
    res = vm.run("cd; ls /tmp/pwned /tmp/pwned2 /tmp/pwned3 pwned4 pwned5 2>&1; ls /tmp", timeout=30)
    assert res.stdout.count("No such file or directory") == 5, res.stdout
    assert vm.run(f"test -f {shlex.quote(path)}").ok, res.stdout


def test_guest_refuses_password_login_and_memhp_refuses_unknown_host_keys(boot):
    """Keys only, both ways: the guest takes no password, and memhp trusts no host key but the
    one recorded with the image: none recorded, or a different one, is an error at once (not
    a retry until the SSH deadline)."""
    from harness.vm.ssh import SSH, HostKeyError
    vm = boot()
    port = vm.machine.runtime.ssh_port
    for password in ("", "root", "memhp"):
        c = paramiko.SSHClient()
        c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        try:
            with pytest.raises(paramiko.AuthenticationException):
                c.connect("127.0.0.1", port=port, username="root", password=password,
                          look_for_keys=False, allow_agent=False, timeout=20, banner_timeout=20,
                          auth_timeout=20)
        finally:
            c.close()
    with pytest.raises(HostKeyError, match="no host key recorded"):
        SSH("127.0.0.1", port, vm.image.ssh_key, "")
    other = paramiko.Ed25519Key.from_private_key_file(str(vm.image.ssh_key))  # a real key, not the guest's
    assert other.get_base64() not in vm.image.host_key_pub
    t0 = time.monotonic()
    with pytest.raises(HostKeyError, match="host key mismatch"):
        SSH("127.0.0.1", port, vm.image.ssh_key, f"{other.get_name()} {other.get_base64()}").connect(timeout=60)
    assert time.monotonic() - t0 < 30, "a wrong host key was retried instead of refused"
    assert vm.run("true", timeout=30).ok   # and the key still works
