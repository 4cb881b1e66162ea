"""A tiny busybox initramfs for the test bed's nested guests (Xen PV and libvirt/qemu).

The guest is Debian's own kernel plus this archive: busybox, the kernel
modules its /init loads (dependencies first), and the /init script itself.
"""

from __future__ import annotations

import gzip
import io
import shutil
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

from .cmd import output

APPLETS = ("sh", "mount", "insmod", "head", "sleep", "cat", "echo", "sync", "ls", "dd", "sha256sum", "printf")

# The kernel runs /sbin/poweroff on a shutdown request (Xen's `xl shutdown`).
# busybox's own poweroff would signal PID 1, which is a shell here, so power
# off directly.
POWEROFF = """#!/bin/sh
sync
exec /bin/busybox poweroff -f
"""

LOAD_MODULES = """while read -r module; do
    insmod "/lib/modules/$module" || echo "{prefix}-ERROR: insmod $module failed"
done </lib/modules/load.order
"""
"""The /init fragment that loads the archive's modules in order (format with the guest's prefix)."""


def busybox_initramfs(init: str, modules: Sequence[str]) -> bytes:
    """A gzip'd newc archive: busybox, /init, and `modules` with their dependencies in load.order."""
    archive = _Newc()
    for directory in ("bin", "sbin", "dev", "proc", "sys", "lib", "lib/modules"):
        archive.directory(directory)
    archive.device("dev/console", 5, 1)
    archive.device("dev/null", 1, 3)
    archive.file("bin/busybox", Path("/bin/busybox").read_bytes(), 0o755)
    for applet in APPLETS:
        archive.symlink(f"bin/{applet}", "busybox")
    archive.file("sbin/poweroff", POWEROFF.encode(), 0o755)
    archive.file("init", init.encode(), 0o755)
    order: list[str] = []
    for module in modules:
        for path in module_files(module):
            if path.name not in order:
                archive.file(f"lib/modules/{path.name}", path.read_bytes(), 0o644)
                order.append(path.name)
    archive.file("lib/modules/load.order", "".join(f"{name}\n" for name in order).encode(), 0o644)
    return gzip.compress(archive.finish(), compresslevel=9, mtime=0)


def module_files(module: str) -> list[Path]:
    """The .ko files to insmod for `module`, dependencies first (none if built in)."""
    files = []
    for line in output("modprobe", "--show-depends", module).splitlines():
        fields = line.split()
        if fields and fields[0] == "insmod":
            path = Path(fields[1])
            if path.suffix != ".ko":
                raise AssertionError(f"{path}: compressed modules are not supported by the guest initramfs")
            files.append(path)
    return files


class _Newc:
    """A minimal writer for the newc cpio format the kernel unpacks."""

    def __init__(self) -> None:
        self._buffer = io.BytesIO()
        self._inode = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._inode += 1
        self._buffer.write(b"070701" + b"".join(b"%08x" % value for value in fields) + encoded)
        self._pad()
        self._buffer.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buffer.write(b"\0" * (-self._buffer.tell() % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._buffer.getvalue()


def debian_kernel() -> Path:
    """Debian's own kernel from the image, which boots as a Xen PV guest and under qemu alike."""
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        raise AssertionError("no /boot/vmlinuz-* in the image")
    return kernels[-1]


def cached_copy(cache: Path, build: Callable[[], bytes], out: Path) -> Path:
    """Copy the archive cached at `cache` (built by `build` on first use in this boot) to `out`."""
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = cache.with_suffix(".tmp")
        staging.write_bytes(build())
        staging.rename(cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cache, out)
    return out
