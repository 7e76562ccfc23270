"""apt and package failures are the host's, never bad input: PackageError (INFRA, exit 3), not
KernelError (a UsageError, exit 2). The packages built here are real .debs (dpkg-deb --build)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness import host
from harness.errors import InfraError, PackageError, UsageError
from harness.kernels import kbuild, selftest
from harness.reports import report


def _no_candidate(monkeypatch):
    monkeypatch.setattr(host, "apt_candidate", lambda pkg: None)


def _assert_infra(exc: BaseException) -> None:
    assert isinstance(exc, InfraError) and not isinstance(exc, UsageError), type(exc)
    assert report.classify(exc) == report.INFRA and report.exit_for_error(exc) == 3


def test_source_tree_without_apt_candidate_is_infra(monkeypatch, tmp_path):
    _no_candidate(monkeypatch)
    with pytest.raises(PackageError, match="apt has no candidate for linux-source-6.1") as e:
        kbuild.source_tree("6.1", tmp_path)
    _assert_infra(e.value)


def test_selftest_without_apt_candidate_is_infra(monkeypatch, tmp_path):
    _no_candidate(monkeypatch)
    with pytest.raises(PackageError, match="apt has no candidate for linux-source-6.12") as e:
        selftest.fetch((6, 12, 57), tmp_path)
    _assert_infra(e.value)


def _deb(tmp_path: Path, pkg: str, files: dict) -> Path:
    root = tmp_path / "pkgroot"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(f"Package: {pkg}\nVersion: 1.0-1\nArchitecture: all\n"
                                             f"Maintainer: memhp <memhp@localhost>\nDescription: test\n")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    deb = tmp_path / f"{pkg}_1.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb


def test_downloaded_source_package_without_its_tarball_is_infra(tmp_path):
    """A .deb apt gave us that lacks /usr/src/<pkg>.tar.xz: the package is at fault, not the user."""
    deb = _deb(tmp_path, "linux-source-6.1", {"usr/share/doc/linux-source-6.1/README": "x\n"})
    with pytest.raises(PackageError, match="has no /usr/src/linux-source-6.1.tar.xz") as e:
        kbuild._unpack_source(deb, "linux-source-6.1", "1.0-1", tmp_path / "src" / "linux-source-6.1_1.0-1")
    _assert_infra(e.value)


def test_downloaded_source_package_without_the_selftest_is_infra(tmp_path):
    """The selftest is streamed out of the package's tarball; a tarball without it is PackageError."""
    src = tmp_path / "tarsrc"
    (src / "linux-source-6.1" / "README").parent.mkdir(parents=True)
    (src / "linux-source-6.1" / "README").write_text("no selftests here\n")
    tarball = tmp_path / "linux-source-6.1.tar.xz"
    subprocess.run(["tar", "-C", str(src), "-cJf", str(tarball), "linux-source-6.1"], check=True)
    deb = _deb(tmp_path, "linux-source-6.1", {})
    # repack with the tarball inside /usr/src
    root = tmp_path / "pkgroot"
    (root / "usr" / "src").mkdir(parents=True, exist_ok=True)
    (root / "usr" / "src" / tarball.name).write_bytes(tarball.read_bytes())
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True, capture_output=True)
    into = tmp_path / "selftests" / "linux-source-6.1_1.0-1" / "x"
    into.parent.mkdir(parents=True)
    with pytest.raises(PackageError, match="no tools/testing/selftests/memory-hotplug") as e:
        selftest._extract_selftest(deb, "linux-source-6.1", into)
    _assert_infra(e.value)
