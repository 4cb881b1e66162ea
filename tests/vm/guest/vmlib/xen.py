"""Xen dom0 helpers: start the toolstack, build a tiny PV guest, run it.

The PV guest is Debian's own kernel with a ~1 MB busybox initramfs. Its
/init loads xen-blkfront, prints the first line of /dev/xvda to its console
(`XBDOMU-MARKER: ...`), prints `XBDOMU-READY` and waits; `xl shutdown` makes
the kernel run /sbin/poweroff, which powers the domain off. xenconsoled
logs each guest's console to /var/log/xen/console/guest-NAME.log (the image
sets XENCONSOLED_ARGS in /etc/default/xen).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .cmd import CommandFailed, read_from, run
from .initramfs import busybox_initramfs, cached_copy, debian_kernel

if TYPE_CHECKING:  # storage imports this module
    from .storage import SeedLayout

CONSOLE_LOG_DIR = Path("/var/log/xen/console")
INITRAMFS_CACHE = Path("/run/xbtest/domu-initrd.img")
MARKER_PREFIX = "XBDOMU-MARKER:"
READY = "XBDOMU-READY"

DOMU_INIT = """#!/bin/sh
# /init of the test bed's PV guest (built by tests/vm/guest/vmlib/xen.py).
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "XBDOMU: booted $(cat /proc/sys/kernel/osrelease)"
while read -r module; do
    insmod "/lib/modules/$module" || echo "XBDOMU-ERROR: insmod $module failed"
done </lib/modules/load.order
n=0
while [ ! -b /dev/xvda ] && [ "$n" -lt 300 ]; do
    sleep 0.1
    n=$((n + 1))
done
if [ -b /dev/xvda ]; then
    echo "XBDOMU-MARKER: $(head -n 1 /dev/xvda | head -c 200)"
else
    echo "XBDOMU-ERROR: no /dev/xvda"
fi
case " $(cat /proc/cmdline) " in
*" xbcounter "*)
    # The two-disk guest (vmlib.counterguest): report what its disks hold at boot, then write a strictly
    # increasing counter to xvda and then the same value to xvdb, each write O_DIRECT, so at any instant
    # xvdb holds xvda's value or one less. It goes on from the value xvda holds, across restarts.
    n=0
    while [ ! -b /dev/xvdb ] && [ "$n" -lt 300 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    for disk in xvda xvdb; do
        set -- $(sha256sum "/dev/$disk")
        echo "XBDOMU-SHA256: $disk $1"
    done
    set -- $(dd if=/dev/xvda bs=512 count=1 2>/dev/null | head -n 1)
    i=0
    [ "${1:-}" = XBCOUNT ] && i=$2
    echo "XBDOMU-COUNTER-FROM: $i"
    while :; do
        i=$((i + 1))
        for disk in xvda xvdb; do
            printf 'XBCOUNT %20d\n' "$i" | dd of="/dev/$disk" bs=512 conv=sync,notrunc oflag=direct 2>/dev/null ||
                echo "XBDOMU-WRITE-FAILED: $disk $i"
        done
    done &
    ;;
esac
echo "XBDOMU-READY"
while :; do sleep 3600; done
"""


def in_dom0() -> bool:
    try:
        return "control_d" in Path("/proc/xen/capabilities").read_text()
    except OSError:
        return False


def start_xen(timeout: float = 180) -> None:
    """Make dom0 ready for guests: blkback loaded, xenstored and xenconsoled running."""
    if not in_dom0():
        raise AssertionError("not running as a Xen dom0 (/proc/xen/capabilities lacks control_d)")
    run("modprobe", "xen-blkback")
    CONSOLE_LOG_DIR.mkdir(parents=True, exist_ok=True)  # xenconsoled logs there but does not create it
    run("systemctl", "start", "xen.service", timeout=timeout)
    deadline = time.monotonic() + timeout
    while run("xl", "list", timeout=60, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"xl list still fails {timeout:.0f}s after starting xen.service")
        time.sleep(1)


domu_kernel = debian_kernel


def build_domu_initramfs(out: Path) -> Path:
    """Write the guest's gzip'd newc initramfs to `out` (cached per boot)."""
    return cached_copy(INITRAMFS_CACHE, _initramfs_bytes, out)


def _initramfs_bytes() -> bytes:
    return busybox_initramfs(DOMU_INIT, ["xen-blkfront"])


@dataclass(frozen=True)
class DomU:
    """A PV guest: kernel, busybox initramfs, one disk (an LV or an image file) as xvda."""

    name: str
    kernel: Path
    ramdisk: Path
    disk: Path
    memory_mb: int = 128

    def config_text(self) -> str:
        return (
            f'name = "{self.name}"\n'
            'type = "pv"\n'
            f'kernel = "{self.kernel}"\n'
            f'ramdisk = "{self.ramdisk}"\n'
            'extra = "console=hvc0 quiet"\n'
            f"memory = {self.memory_mb}\n"
            "vcpus = 1\n"
            f"disk = ['format=raw, vdev=xvda, access=rw, target={self.disk}']\n"
            'on_poweroff = "destroy"\n'
            'on_reboot = "destroy"\n'
            'on_crash = "destroy"\n'
        )

    def write_config(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.config_text())
        return path


def write_seed_vm_files(vmdir: Path, vm: str, disk_image: Path) -> Path:
    """Put a bootable PV guest's files into vmdir: vmlinuz, initrd.img and VM.cfg.

    Everything vm1 needs lives in its directory, so a restore of the
    directory alone gives back a guest that boots.
    """
    kernel = vmdir / "vmlinuz"
    shutil.copyfile(domu_kernel(), kernel)
    ramdisk = build_domu_initramfs(vmdir / "initrd.img")
    return DomU(vm, kernel, ramdisk, disk_image).write_config(vmdir / f"{vm}.cfg")


def console_log(name: str) -> Path:
    return CONSOLE_LOG_DIR / f"guest-{name}.log"


def domain_exists(name: str) -> bool:
    return run("xl", "domid", name, timeout=60, check=False).returncode == 0


def wait_until_gone(name: str, timeout: float = 120) -> float:
    """Poll until `xl domid NAME` fails; `xl shutdown -w` returns before that."""
    started = time.monotonic()
    while domain_exists(name):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"domain {name} still exists {timeout:.0f}s after shutdown")
        time.sleep(0.5)
    return time.monotonic() - started


def shutdown(name: str, timeout: float = 180) -> None:
    """`xl shutdown -w`, then wait until the domain has really left; destroy as a last resort."""
    try:
        run("xl", "shutdown", "-w", name, timeout=timeout)
        wait_until_gone(name, timeout)
    except (CommandFailed, AssertionError):
        if domain_exists(name):
            run("xl", "destroy", name, timeout=60, check=False)
            wait_until_gone(name, 60)
        raise


@dataclass(frozen=True)
class RunningDomain:
    name: str
    console: str
    """The guest's console output of this boot, up to READY."""
    create_seconds: float
    ready_seconds: float

    @property
    def marker(self) -> str | None:
        """The first line of the guest's xvda, as the guest read it."""
        for line in self.console.splitlines():
            if MARKER_PREFIX in line:
                return line.split(MARKER_PREFIX, 1)[1].strip()
        return None


@dataclass(frozen=True)
class SeedVm:
    """A PV guest started from the seed layout's files (what the `vm1` fixture yields)."""

    layout: SeedLayout
    domain: RunningDomain


def create(config: Path, name: str, timeout: float = 300, ready_timeout: float = 180) -> RunningDomain:
    """`xl create` and wait for the guest's READY line on its console."""
    log = console_log(name)
    offset = log.stat().st_size if log.exists() else 0
    started = time.monotonic()
    run("xl", "create", config, timeout=timeout)
    created = time.monotonic()
    while True:
        text = read_from(log, offset)
        if READY in text:
            return RunningDomain(name, text, created - started, time.monotonic() - created)
        if re.search(r"XBDOMU-ERROR|Kernel panic", text) or not domain_exists(name):
            raise AssertionError(f"domain {name} failed to come up; its console:\n{text[-3000:]}")
        if time.monotonic() - created > ready_timeout:
            raise AssertionError(
                f"domain {name} not ready {ready_timeout:.0f}s after xl create; its console:\n{text[-3000:]}"
            )
        time.sleep(0.5)


@contextmanager
def running(config: Path, name: str) -> Iterator[RunningDomain]:
    """A guest for the duration of a with-block; shut down (and gone) afterwards."""
    try:
        yield create(config, name)
    finally:
        if domain_exists(name):
            shutdown(name)
