"""Build and cache the test bed image.

The image is built by image/build.sh with mmdebstrap and cached under
<cache>/<key>/, where the key hashes every file in tests/vm/image/ (the
package list and the build scripts). A build goes into a temporary directory
beside the cache entry and is renamed into place only when complete, so a
cache entry is never half-built. Cached images are never written to: each
boot runs on a copy-on-write overlay (see qemu.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from .config import IMAGE_DIR, InfraError, Settings

log = logging.getLogger(__name__)

BUILD_TIMEOUT = 1800.0
BUILD_SPACE_NEEDED = 6 * 2**30
"""The unpacked tree, the downloaded packages and the ext4 image side by side."""
KEEP_IMAGES = 3
DEBIAN_SUITES = frozenset({"bookworm", "bookworm-updates", "bookworm-security"})
# Acquire options worth carrying from the host into mmdebstrap's apt: proxies
# and the validity checks that a snapshot mirror needs relaxed.
APT_OPTION_PATTERN = re.compile(r"^Acquire::(https?::Proxy|Check-Valid-Until|Check-Date|Retries)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Image:
    """A finished, read-only cache entry."""

    directory: Path
    key: str

    @property
    def rootfs(self) -> Path:
        return self.directory / "rootfs.img"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def xen(self) -> Path:
        return self.directory / "xen"

    def files(self) -> tuple[Path, ...]:
        return (self.rootfs, self.kernel, self.initrd, self.xen)

    def is_complete(self) -> bool:
        return all(path.is_file() for path in self.files())


def image_key(image_dir: Path = IMAGE_DIR) -> str:
    """Hash the package list and the build scripts: the cache key."""
    digest = hashlib.sha256()
    for path in sorted(p for p in image_dir.rglob("*") if p.is_file()):
        if "__pycache__" in path.parts:
            continue
        digest.update(path.relative_to(image_dir).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def ensure_image(settings: Settings, build_log: Path, report: Callable[[str], None] = log.info) -> tuple[Image, bool]:
    """Return the cached image for the current key, building it if needed.

    The second value tells whether this call built it.
    """
    key = image_key()
    cache = settings.cache_dir
    image = Image(cache / key, key)
    if image.is_complete():
        _touch(image.directory)
        return image, False
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InfraError(f"cannot create the image cache {cache}: {exc.strerror}") from exc
    with _locked(cache / ".lock"):
        if image.is_complete():  # another run built it while we waited
            _touch(image.directory)
            return image, False
        _remove_stale_builds(cache)
        check_free_space(cache, BUILD_SPACE_NEEDED, "build the test bed image")
        staging = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=cache))
        report(f"building image {key} with mmdebstrap (a few minutes; log: {build_log})")
        try:
            _run_build(staging, settings, build_log)
            if not Image(staging, key).is_complete():
                raise InfraError(f"image build finished but left no complete image; see {build_log}")
            staging.rename(image.directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _prune_old_images(cache, keep=image.directory)
    return image, True


def _touch(path: Path) -> None:
    """Mark a cache entry as recently used (pruning keeps the newest)."""
    with suppress(OSError):  # a read-only cache still works
        os.utime(path)


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _remove_stale_builds(cache: Path) -> None:
    """Remove staging directories of builds that died (we hold the lock)."""
    for stale in cache.glob(".build-*"):
        log.info("removing stale image build %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _prune_old_images(cache: Path, keep: Path) -> None:
    entries = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP_IMAGES:]:
        if old != keep:
            log.info("pruning old test bed image %s", old)
            shutil.rmtree(old, ignore_errors=True)


def check_free_space(path: Path, needed: int, purpose: str) -> None:
    """Fail with one clear line when `path` has less than `needed` bytes free."""
    free = shutil.disk_usage(path).free
    if free < needed:
        raise InfraError(
            f"not enough free disk space to {purpose}: {free / 2**30:.1f} GiB free in {path},"
            f" {needed / 2**30:.1f} GiB needed"
        )


def _run_build(staging: Path, settings: Settings, build_log: Path) -> None:
    if shutil.which("mmdebstrap") is None:
        raise InfraError("mmdebstrap not found: run `make deps` (tests/vm/provision.sh) first")
    sources = staging / "sources.list"
    sources.write_text(apt_sources(settings.mirror))
    argv = [str(IMAGE_DIR / "build.sh"), str(staging), str(sources), *host_apt_options()]
    build_log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(build_log, "wb") as out:
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=BUILD_TIMEOUT,
                env={**os.environ, "LC_ALL": "C.UTF-8"},
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise InfraError(f"image build exceeded {BUILD_TIMEOUT:.0f}s; see {build_log}") from None
    if proc.returncode != 0:
        raise InfraError(describe_build_failure(build_log.read_text(errors="replace"), proc.returncode, build_log))
    log.info("image built in %.0fs", time.monotonic() - started)


_NETWORK_ERRORS = re.compile(
    r"(Temporary failure resolving|Could not resolve|Failed to fetch|Could not connect"
    r"|Connection (?:refused|timed out)|Unable to connect|Network is unreachable)",
)


def describe_build_failure(output: str, returncode: int, build_log: Path) -> str:
    """Turn a failed build's output into one line that names the likely cause."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if _NETWORK_ERRORS.search(line):
            return f"mmdebstrap cannot reach the Debian package registry: {line} (log: {build_log})"
    errors = [line for line in lines if line.startswith(("E:", "build.sh:")) or " E: " in line]
    detail = errors[-1] if errors else (lines[-1] if lines else "no output")
    return f"image build failed (exit {returncode}): {detail} (log: {build_log})"


def apt_sources(mirror: str | None) -> str:
    """The apt sources for the image: the host's own bookworm entries.

    Using the host's sources keeps the build on whatever mirror or proxy the
    machine is set up for; XENBACKUP_TESTVM_MIRROR overrides them.
    """
    if mirror:
        return "".join(f"deb {mirror} {suite} main\n" for suite in ("bookworm", "bookworm-updates"))
    entries: list[str] = []
    root = Path("/etc/apt")
    candidates = [root / "sources.list", *sorted((root / "sources.list.d").glob("*"))]
    for path in candidates:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.name.endswith(".sources"):
            entries += deb822_to_one_line(text)
        elif path.name.endswith(".list"):
            entries += one_line_entries(text)
    if not entries:
        raise InfraError(
            "the host has no Debian bookworm apt source to build the image from;"
            " configure one or set XENBACKUP_TESTVM_MIRROR"
        )
    return "".join(f"{entry}\n" for entry in entries)


def one_line_entries(text: str) -> list[str]:
    """Keep the `deb` lines of a sources.list that point at Debian bookworm suites."""
    kept = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        fields = line.split()
        if not fields or fields[0] != "deb":
            continue
        rest = fields[1:]
        if rest and rest[0].startswith("["):
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if len(rest) >= 2 and rest[1] in DEBIAN_SUITES:
            kept.append(line)
    return kept


def deb822_to_one_line(text: str) -> list[str]:
    """Convert the Debian bookworm stanzas of a deb822 .sources file to one-line entries."""
    kept = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        current = None
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and current:
                fields[current] += "\n" + line.strip()
                continue
            name, _, value = line.partition(":")
            current = name.strip().lower()
            fields[current] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        suites = fields.get("suites", "").split()
        signed_by = fields.get("signed-by", "")
        option = f"[signed-by={signed_by}] " if signed_by and "\n" not in signed_by else ""
        components = fields.get("components", "main")
        for uri in fields.get("uris", "").split():
            kept += [f"deb {option}{uri} {suite} {components}" for suite in suites if suite in DEBIAN_SUITES]
    return kept


def host_apt_options() -> list[str]:
    """The host's proxy and validity settings, as mmdebstrap --aptopt values."""
    try:
        dump = subprocess.run(
            ["apt-config", "dump", "Acquire"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.rstrip(";") for line in dump.splitlines() if APT_OPTION_PATTERN.match(line)]
