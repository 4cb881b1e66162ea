"""The Debian package and the RPM build from the tree and carry the units, catalog and generator."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SYSTEM_PATH = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
UNITS = sorted(path.name for path in (ROOT / "units").iterdir() if path.suffix in (".service", ".timer"))

needs_debhelper = pytest.mark.skipif(shutil.which("dpkg-buildpackage") is None,
                                     reason="dpkg-dev/debhelper not installed (tests/vm/provision.sh installs them)")
needs_rpmbuild = pytest.mark.skipif(shutil.which("rpmbuild") is None,
                                    reason="rpmbuild not installed (Debian: the rpm package; tests/vm/provision.sh)")


def _run(*argv: str | Path) -> str:
    out = subprocess.run([str(arg) for arg in argv], capture_output=True, text=True, check=False,
                         env=SYSTEM_PATH, timeout=600)
    assert out.returncode == 0, f"{argv}: exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    _run(ROOT / "packaging" / "build-deb.sh", out)
    (package,) = out.glob("xenbackup_*_all.deb")
    return package


@pytest.fixture(scope="module")
def rpm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rpm")
    _run(ROOT / "packaging" / "rpm" / "build-rpm.sh", out)
    (package,) = out.glob("xenbackup-*.noarch.rpm")
    return package


@needs_debhelper
def test_debian_package_contents(deb: Path) -> None:
    listing = _run("dpkg", "-c", deb)
    for path in ("./usr/bin/xenbackup", "./usr/bin/xenbackup-generator",
                 *(f"./lib/systemd/system/{unit}" for unit in UNITS),
                 "./usr/lib/systemd/catalog/xenbackup.catalog",
                 "./lib/systemd/system-generators/xenbackup-generator -> /usr/bin/xenbackup-generator",
                 "./usr/lib/python3/dist-packages/xenbackup/cli.py",
                 "./etc/xenbackup/xenbackup.toml.example"):
        assert path in listing, path
    # Only root may list the directory that holds repository passwords.
    assert re.search(r"^drwx------ root/root .* \./etc/xenbackup/$", listing, re.MULTILINE), listing
    # The admin's config is not the package's: dpkg --purge deletes conffiles, even edited ones.
    assert "./etc/xenbackup/xenbackup.toml\n" not in listing
    depends = _run("dpkg-deb", "-f", deb, "Depends")
    assert "python3-pystemd (>= 0.11)" in depends and "restic" in depends and "lvm2" in depends, depends


@needs_debhelper
def test_debian_package_command_starts_without_site(deb: Path, tmp_path: Path) -> None:
    """/usr/bin/xenbackup is the package's launcher: no site module (about 85 ms a start under emulation)."""
    _run("dpkg-deb", "-x", deb, tmp_path)
    launcher = tmp_path / "usr" / "bin" / "xenbackup"
    assert launcher.read_text().startswith("#!/usr/bin/python3 -S\n")
    # Run through its own #! line; the extracted tree stands in for /usr/lib/python3/dist-packages.
    env = {**SYSTEM_PATH, "PYTHONPATH": str(tmp_path / "usr/lib/python3/dist-packages"),
           "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert done.returncode == 0 and "usage: xenbackup" in done.stdout, done.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "xenbackup.cli" in imported and "site" not in imported, sorted(imported)


@needs_debhelper
def test_debian_package_conffiles_and_unit_enablement(deb: Path, tmp_path: Path) -> None:
    control = tmp_path / "control"
    _run("dpkg-deb", "-e", deb, control)
    assert (control / "conffiles").read_text().split() == ["/etc/xenbackup/xenbackup.toml.example"]
    postinst = (control / "postinst").read_text()
    enabled = set(re.findall(r"deb-systemd-helper enable '([^']+)'", postinst))
    assert enabled == {"xenbackup-cleanup.service", "xenbackup-prune.timer", "xenbackup-verify.timer"}
    started = re.findall(r"deb-systemd-invoke \$_dh_action (.*) >/dev/null", postinst)
    assert started == ["'xenbackup-prune.timer' 'xenbackup-verify.timer'"], started


@needs_debhelper
@pytest.mark.skipif(shutil.which("lintian") is None, reason="lintian not installed (tests/vm/provision.sh installs it)")
def test_lintian_reports_nothing_but_explained_overrides(deb: Path) -> None:
    out = subprocess.run(["lintian", "--pedantic", "--fail-on", "error,warning,pedantic", str(deb)],
                         capture_output=True, text=True, check=False, env=SYSTEM_PATH, timeout=600)
    tags = [line for line in out.stdout.splitlines() if re.match(r"[EWP]: ", line)]
    assert out.returncode == 0 and not tags, out.stdout + out.stderr
    overrides = (ROOT / "packaging" / "debian" / "xenbackup.lintian-overrides").read_text().splitlines()
    for number, line in enumerate(overrides):
        if line.startswith("xenbackup:"):
            assert any(earlier.startswith("#") for earlier in overrides[:number]), f"override without a why: {line}"
            assert overrides[number - 1].startswith(("#", "xenbackup:")), f"override without a why: {line}"


@needs_rpmbuild
def test_rpm_file_list(rpm: Path) -> None:
    files = set(_run("rpm", "-qlp", rpm).split())
    sitelib = next(path for path in files if path.endswith("/site-packages/xenbackup"))
    expected = {"/usr/bin/xenbackup", "/usr/bin/xenbackup-generator",
                *(f"/usr/lib/systemd/system/{unit}" for unit in UNITS),
                "/usr/lib/systemd/system-generators/xenbackup-generator",
                "/usr/lib/systemd/system-preset/50-xenbackup.preset",
                "/usr/lib/systemd/catalog/xenbackup.catalog",
                "/etc/xenbackup", "/etc/xenbackup/xenbackup.toml.example",
                f"{sitelib}/cli.py", f"{sitelib}/generator.py"}
    assert expected <= files, sorted(expected - files)
    assert "/etc/xenbackup/xenbackup.toml" not in files
    config = _run("rpm", "-qcp", rpm).split()
    assert config == ["/etc/xenbackup/xenbackup.toml.example"]
    modes = _run("rpm", "-qp", "--qf", "[%{FILEMODES:perms} %{FILENAMES}\n]", rpm)
    assert "drwx------ /etc/xenbackup\n" in modes, modes
    link = _run("rpm", "-qp", "--qf", "[%{FILENAMES} -> %{FILELINKTOS}\n]", rpm)
    assert "/usr/lib/systemd/system-generators/xenbackup-generator -> /usr/bin/xenbackup-generator" in link


@needs_rpmbuild
def test_rpm_requirements(rpm: Path) -> None:
    requires = {line.strip() for line in _run("rpm", "-qRp", rpm).splitlines()}
    for requirement in ("python3 >= 3.11", "python3dist(pystemd) >= 0.11", "restic", "lvm2", "util-linux",
                        "systemd"):
        assert requirement in requires, (requirement, sorted(requires))
    recommends = set(_run("rpm", "-qp", "--recommends", rpm).split("\n"))
    assert {"thin-provisioning-tools", "xfsprogs", "e2fsprogs"} <= recommends
    assert _run("rpm", "-qp", "--qf", "%{ARCH}", rpm) == "noarch"
