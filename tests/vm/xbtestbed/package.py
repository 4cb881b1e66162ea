"""The product's Debian package, built on this machine for the guests that install it.

A host pytest run builds it once (packaging/build-deb.sh, a few seconds) and
every guest boot of that run installs the same file, as an admin would with
`apt-get install ./xenbackup_*.deb`.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .config import REPO_ROOT, InfraError

BUILD_TIMEOUT = 600.0
_built: dict[Path, Path] = {}
# Suites boot in parallel threads; the first builds the package, the others wait for it.
_lock = threading.Lock()


def debian_package(out_dir: Path, report: Callable[[str], None]) -> Path:
    """The .deb built from the tree into out_dir; built on the first call of this process only."""
    with _lock:
        return _build_once(out_dir, report)


def _build_once(out_dir: Path, report: Callable[[str], None]) -> Path:
    if out_dir in _built and _built[out_dir].is_file():
        return _built[out_dir]
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    log = out_dir / "build.log"
    started = time.monotonic()
    with log.open("w") as output:
        result = subprocess.run(
            ["sh", str(REPO_ROOT / "packaging" / "build-deb.sh"), str(out_dir)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    if result.returncode != 0:
        raise InfraError(
            f"building the product's .deb failed (packaging/build-deb.sh exit {result.returncode}); see {log}"
        )
    packages = sorted(out_dir.glob("xenbackup_*_all.deb"))
    if len(packages) != 1:
        raise InfraError(f"packaging/build-deb.sh left {len(packages)} xenbackup_*_all.deb files in {out_dir}")
    report(f"built {packages[0].name} in {time.monotonic() - started:.0f}s")
    _built[out_dir] = packages[0]
    return packages[0]
