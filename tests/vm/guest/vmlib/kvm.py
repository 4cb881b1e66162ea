"""A KVM host in the guest: a real libvirtd with its qemu driver, and a tiny domain on LVs.

The test bed guest has no /dev/kvm (it runs under TCG itself), so the domain
is `type='qemu'`: TCG inside TCG. It boots Debian's kernel directly with a
busybox initramfs whose /init loads virtio_blk, prints the first line of
each of its disks to the serial console (`XBKVM-MARKER: ...` for vda,
`XBKVM-MARKER-vdb: ...` for vdb) and `XBKVM-READY`, then waits. It ignores
ACPI, so `virsh shutdown` does nothing and a restore with --stop ends in
`virsh destroy` after the configured shutdown_timeout. The serial console is
a file that libvirt appends to across starts.
"""

from __future__ import annotations

import lzma
import re
import tempfile
import time
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from .cmd import CommandFailed, output, read_from, run
from .initramfs import LOAD_MODULES, busybox_initramfs, cached_copy, debian_kernel

BOOT_DIR = Path("/var/lib/libvirt/boot")
CONSOLE_DIR = Path("/var/log/libvirt/qemu")
PID_DIR = Path("/run/libvirt/qemu")
INITRAMFS_CACHE = Path("/run/xbtest/kvm-initrd.img")
MARKER_PREFIX = "XBKVM-MARKER:"
READY = "XBKVM-READY"
GUEST_MODULES = ("virtio_pci", "virtio_blk")
GUEST_CMDLINE = "console=ttyS0 quiet panic=-1 mitigations=off"

GUEST_INIT = (
    """#!/bin/sh
# /init of the test bed's libvirt/qemu guest (built by tests/vm/guest/vmlib/kvm.py).
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "XBKVM: booted $(cat /proc/sys/kernel/osrelease), uptime $(cat /proc/uptime)"
"""
    + LOAD_MODULES.format(prefix="XBKVM")
    + """n=0
while { [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; } && [ "$n" -lt 600 ]; do
    sleep 0.1
    n=$((n + 1))
done
for disk in vda vdb; do
    if [ -b "/dev/$disk" ]; then
        line=$(head -n 1 "/dev/$disk" | head -c 200)
        if [ "$disk" = vda ]; then
            echo "XBKVM-MARKER: $line"
        else
            echo "XBKVM-MARKER-$disk: $line"
        fi
    else
        echo "XBKVM-ERROR: no /dev/$disk"
    fi
done
echo "XBKVM-READY uptime $(cat /proc/uptime)"
while :; do sleep 3600; done
"""
)


def start_libvirtd(timeout: float = 180) -> float:
    """Start the monolithic libvirtd (what Debian 12 runs) and wait until virsh answers; return the seconds."""
    started = time.monotonic()
    run("systemctl", "start", "libvirtd.service", timeout=timeout)
    deadline = started + timeout
    while run("virsh", "list", "--all", timeout=60, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"virsh still gets no answer {timeout:.0f}s after starting libvirtd")
        time.sleep(1)
    return time.monotonic() - started


def build_guest_initramfs(out: Path) -> Path:
    """Write the guest's gzip'd newc initramfs to `out` (built once per boot)."""
    return cached_copy(INITRAMFS_CACHE, lambda: busybox_initramfs(GUEST_INIT, GUEST_MODULES), out)


@dataclass(frozen=True)
class GuestDisk:
    source: Path
    """The block device as the domain XML names it (`/dev/VG/LV` or `/dev/mapper/VG-LV`)."""
    target: str
    """vda, vdb, ... (virtio)."""


@dataclass(frozen=True)
class KvmDomain:
    """A persistent libvirt domain of type qemu: direct kernel boot, virtio disks on LVs, an empty CD-ROM."""

    name: str
    kernel: Path
    initrd: Path
    disks: tuple[GuestDisk, ...]
    memory_mib: int = 192

    @property
    def console_log(self) -> Path:
        return CONSOLE_DIR / f"{self.name}-serial.log"

    def xml(self) -> str:
        domain = ET.Element("domain", type="qemu")
        ET.SubElement(domain, "name").text = self.name
        ET.SubElement(domain, "memory", unit="MiB").text = str(self.memory_mib)
        ET.SubElement(domain, "vcpu").text = "1"
        boot = ET.SubElement(domain, "os")
        ET.SubElement(boot, "type", arch="x86_64", machine="pc").text = "hvm"
        ET.SubElement(boot, "kernel").text = str(self.kernel)
        ET.SubElement(boot, "initrd").text = str(self.initrd)
        ET.SubElement(boot, "cmdline").text = GUEST_CMDLINE
        ET.SubElement(ET.SubElement(domain, "features"), "acpi")
        for event in ("on_poweroff", "on_reboot", "on_crash"):
            ET.SubElement(domain, event).text = "destroy"
        devices = ET.SubElement(domain, "devices")
        ET.SubElement(devices, "emulator").text = "/usr/bin/qemu-system-x86_64"
        for disk in self.disks:
            element = ET.SubElement(devices, "disk", type="block", device="disk")
            ET.SubElement(element, "driver", name="qemu", type="raw")
            ET.SubElement(element, "source", dev=str(disk.source))
            ET.SubElement(element, "target", dev=disk.target, bus="virtio")
        # A CD-ROM drive without media, as virt-install leaves one: discovery must skip it.
        cdrom = ET.SubElement(devices, "disk", type="file", device="cdrom")
        ET.SubElement(cdrom, "driver", name="qemu", type="raw")
        ET.SubElement(cdrom, "target", dev="hdc", bus="ide")
        ET.SubElement(cdrom, "readonly")
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=str(self.console_log), append="on")
        ET.SubElement(serial, "target", port="0")
        ET.SubElement(devices, "controller", type="usb", model="none")
        ET.SubElement(devices, "memballoon", model="none")
        return ET.tostring(domain, encoding="unicode")

    def define(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".xml", prefix=f"{self.name}-") as file:
            file.write(self.xml())
            file.flush()
            run("virsh", "define", file.name, timeout=120)


def uncompressed_kernel(vmlinuz: Path) -> bytes:
    """The ELF vmlinux inside a bzImage (Debian's is xz-compressed).

    Under TCG inside TCG, the kernel's own xz decompression costs about a
    minute. Debian's kernel carries the PVH entry note, so qemu boots the
    uncompressed ELF directly.
    """
    data = vmlinuz.read_bytes()
    for magic, decompressor in ((b"\xfd7zXZ\x00", lzma.LZMADecompressor), (b"\x1f\x8b\x08", _gunzip)):
        offset = data.find(magic)
        while offset >= 0:
            try:
                elf = decompressor().decompress(data[offset:])
            except (lzma.LZMAError, zlib.error):
                elf = b""
            if elf.startswith(b"\x7fELF"):
                return elf
            offset = data.find(magic, offset + 1)
    raise AssertionError(f"{vmlinuz}: no xz or gzip payload with an ELF kernel inside")


def _gunzip() -> zlib._Decompress:
    return zlib.decompressobj(16 + zlib.MAX_WBITS)


def prepare_boot_files(name: str) -> tuple[Path, Path]:
    """Kernel and initramfs where libvirt's DAC driver may relabel them (not /boot)."""
    BOOT_DIR.mkdir(parents=True, exist_ok=True)
    kernel = BOOT_DIR / f"{name}-vmlinux"
    kernel.write_bytes(uncompressed_kernel(debian_kernel()))
    kernel.chmod(0o644)
    return kernel, build_guest_initramfs(BOOT_DIR / f"{name}-initrd.img")


def domstate(name: str) -> str:
    """`virsh domstate`: running, paused, shut off, ... ("" if libvirt has no such domain)."""
    result = run("virsh", "domstate", name, timeout=60, check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def qemu_pid(name: str) -> int | None:
    """The pid of the domain's qemu process, if it is alive."""
    try:
        pid = int((PID_DIR / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").is_dir() else None


@dataclass(frozen=True)
class GuestBoot:
    """One boot of the domain as its console showed it, up to READY."""

    name: str
    console: str
    start_seconds: float
    """`virsh start` (0 when something else started it)."""
    ready_seconds: float
    """From the start to the READY line."""

    def marker(self, disk: str = "vda") -> str | None:
        """The first line of the guest's disk, as the guest read it."""
        prefix = MARKER_PREFIX if disk == "vda" else f"XBKVM-MARKER-{disk}:"
        for line in self.console.splitlines():
            if prefix in line:
                return line.split(prefix, 1)[1].strip()
        return None


def console_size(domain: KvmDomain) -> int:
    return domain.console_log.stat().st_size if domain.console_log.exists() else 0


def wait_ready(domain: KvmDomain, offset: int, timeout: float, start_seconds: float = 0.0) -> GuestBoot:
    """Wait for READY on the console after byte `offset`; fail early when the domain stops or panics."""
    started = time.monotonic()
    while True:
        text = read_from(domain.console_log, offset)
        if READY in text:
            return GuestBoot(domain.name, text, start_seconds, start_seconds + time.monotonic() - started)
        if re.search(r"XBKVM-ERROR|Kernel panic", text) or domstate(domain.name) not in ("running", "paused"):
            raise AssertionError(
                f"domain {domain.name} failed to come up (state {domstate(domain.name)!r}); its console:\n"
                f"{text[-3000:]}"
            )
        if time.monotonic() - started > timeout:
            raise AssertionError(
                f"domain {domain.name} not ready {timeout:.0f}s after it started"
                f" (state {domstate(domain.name)!r}, qemu pid {qemu_pid(domain.name)}); its console:\n{text[-3000:]}"
            )
        time.sleep(1)


def start(domain: KvmDomain, ready_timeout: float) -> GuestBoot:
    """`virsh start`, then wait for the guest's READY line."""
    offset = console_size(domain)
    started = time.monotonic()
    run("virsh", "start", domain.name, timeout=300)
    return wait_ready(domain, offset, ready_timeout, time.monotonic() - started)


def stop(name: str) -> None:
    """`virsh destroy` (the guest ignores ACPI) if the domain runs."""
    if domstate(name) not in ("shut off", ""):
        run("virsh", "destroy", name, timeout=120, check=False)


def remove(name: str) -> None:
    """Stop and undefine the domain, if libvirt knows it."""
    stop(name)
    if domstate(name):
        run("virsh", "undefine", name, timeout=120, check=False)


@contextmanager
def defined(domain: KvmDomain) -> Iterator[KvmDomain]:
    """The domain defined (not started) for the with-block; stopped and undefined afterwards."""
    remove(domain.name)
    domain.define()
    try:
        yield domain
    finally:
        with suppress(CommandFailed):
            remove(domain.name)


def virsh_xml(name: str) -> ET.Element:
    """`virsh dumpxml NAME`, parsed."""
    return ET.fromstring(output("virsh", "dumpxml", name, timeout=60))
