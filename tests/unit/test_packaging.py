"""The Debian package builds from the tree and carries the units, catalog and generator."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.skipif(shutil.which("dpkg-buildpackage") is None, reason="dpkg-dev/debhelper not installed")
def test_debian_package_contents(tmp_path: Path) -> None:
    out = subprocess.run([str(ROOT / "packaging" / "build-deb.sh"), str(tmp_path)], capture_output=True, text=True,
                         check=False, env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    (deb,) = tmp_path.glob("xenbackup_*_all.deb")
    listing = subprocess.run(["dpkg", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    for path in ("./usr/bin/xenbackup", "./lib/systemd/system/xenbackup@.service",
                 "./lib/systemd/system/xenbackup@.timer", "./usr/lib/systemd/catalog/xenbackup.catalog",
                 "./lib/systemd/system-generators/xenbackup-generator -> /usr/bin/xenbackup-generator",
                 "./usr/lib/python3/dist-packages/xenbackup/cli.py"):
        assert path in listing, path
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True,
                             check=True).stdout
    assert "python3-pystemd" in depends and "restic" in depends and "lvm2" in depends
