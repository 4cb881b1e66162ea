"""A PV guest with two disks on two LVs whose init writes a counter to both, for consistency tests.

The guest's /init (vmlib.xen.DOMU_INIT, enabled by `xbcounter` on its kernel
command line) writes `XBCOUNT <n>` (n right-aligned in 20 columns, one
512-byte sector) to xvda and then the same n to xvdb, O_DIRECT, n strictly
increasing. At any real instant xvdb holds xvda's n or n - 1; two snapshots
taken at different instants of a busy guest break that relation.

The two disks are written the two ways an xl config names a disk and in the
two path forms an LV has: xvda positional with /dev/VG/LV, xvdb key=value with
/dev/mapper/VG-LV (VG and LV names carry dashes, so the mapper name doubles
them).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from . import xen
from .cmd import CommandFailed, output, run
from .storage import clear_disk, create_volume_group, remove_volume_group, wait_for_disks

COUNTER_RE = re.compile(rb"^XBCOUNT +(\d+)\n")
SHA_PREFIX = "XBDOMU-SHA256:"
VG = "xb-db"
DISK_SIZE = "16M"


def mapper_path(vg: str, lv: str) -> Path:
    return Path("/dev/mapper") / f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def parse_counter(sector: bytes, what: str) -> int:
    match = COUNTER_RE.match(sector)
    if match is None:
        raise AssertionError(f"{what}: no counter in its first sector: {sector[:40]!r}")
    return int(match.group(1))


def device_counter(device: Path) -> int:
    """The counter on a device, read with O_DIRECT: blkback bypasses dom0's page cache."""
    sector = subprocess.run(
        ["dd", f"if={device}", "bs=512", "count=1", "iflag=direct", "status=none"],
        capture_output=True, timeout=60, check=True,
    ).stdout
    return parse_counter(sector, str(device))


def device_sha256(device: Path) -> str:
    out = subprocess.run(
        ["sh", "-c", 'dd if="$1" bs=1M iflag=direct status=none | sha256sum', "sh", str(device)],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    return out.split()[0]


def holds_together(xvda: int, xvdb: int) -> bool:
    """True if the pair can have existed at one instant of the guest."""
    return xvdb in (xvda, xvda - 1)


def domain_state(name: str) -> str:
    """The state column of `xl list NAME` (r b p s c d, '-' where a flag is off)."""
    lines = output("xl", "list", name).splitlines()
    return lines[1].split()[4]


def is_paused(name: str) -> bool:
    return "p" in domain_state(name)


@dataclass(frozen=True)
class CounterGuest:
    name: str
    vg: str
    config: Path
    root_lv: str
    data_lv: str

    @property
    def root(self) -> Path:
        return Path("/dev") / self.vg / self.root_lv

    @property
    def data(self) -> Path:
        return mapper_path(self.vg, self.data_lv)

    @property
    def disks(self) -> tuple[str, str]:
        """The disks as the product names them (VG/LV), xvda first."""
        return f"{self.vg}/{self.root_lv}", f"{self.vg}/{self.data_lv}"

    def config_text(self, kernel: Path, ramdisk: Path) -> str:
        return (
            f'name = "{self.name}"\n'
            'type = "pv"\n'
            f'kernel = "{kernel}"\n'
            f'ramdisk = "{ramdisk}"\n'
            'extra = "console=hvc0 quiet xbcounter"\n'
            "memory = 128\n"
            "vcpus = 1\n"
            f"disk = ['phy:{self.root},xvda,w',\n"
            f"        'format=raw, vdev=xvdb, access=rw, target={self.data}']\n"
            'on_poweroff = "destroy"\n'
            'on_reboot = "destroy"\n'
            'on_crash = "destroy"\n'
        )

    def counters(self) -> tuple[int, int]:
        """(xvda, xvdb) as the devices hold them now; only meaningful while the guest is paused."""
        return device_counter(self.root), device_counter(self.data)

    def wait_advancing(self, timeout: float = 60) -> tuple[int, int]:
        """Wait until xvda's counter moves on; returns (before, after)."""
        before = device_counter(self.root)
        deadline = time.monotonic() + timeout
        while (now := device_counter(self.root)) <= before:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}'s counter stuck at {before} for {timeout:.0f}s "
                                     f"(state {domain_state(self.name)})")
            time.sleep(0.5)
        return before, now


def boot_hashes(console: str) -> dict[str, str]:
    """What the guest reported as sha256 of its disks at boot, before it wrote anything."""
    hashes = {}
    for line in console.splitlines():
        if SHA_PREFIX in line:
            disk, digest = line.split(SHA_PREFIX, 1)[1].split()
            hashes[disk] = digest
    return hashes


@contextmanager
def counter_guest(disk: Path, kernel: Path, ramdisk: Path, name: str = "db1",
                  config_dir: Path = Path("/etc/xen")) -> Iterator[CounterGuest]:
    """Build VG `xb-db` on a blank disk with the guest's two LVs and run it; everything removed afterwards."""
    guest = CounterGuest(name, VG, config_dir / f"{name}.cfg", f"{name}-root", f"{name}-data")
    wait_for_disks((disk,))
    clear_disk(disk)
    create_volume_group(VG, disk)
    try:
        for lv in (guest.root_lv, guest.data_lv):
            run("lvcreate", "--yes", "-L", DISK_SIZE, "-n", lv, VG)
            # Something besides the counter, so an image that restores wrongly shows in its hash.
            run("dd", "if=/dev/urandom", f"of=/dev/{VG}/{lv}", "bs=1M", "seek=1", "count=2", "oflag=direct",
                "status=none")
        guest.config.parent.mkdir(parents=True, exist_ok=True)
        guest.config.write_text(guest.config_text(kernel, ramdisk))
        xen.create(guest.config, name)
        yield guest
    finally:
        with suppress(CommandFailed, AssertionError):
            if xen.domain_exists(name):
                if is_paused(name):
                    run("xl", "unpause", name, check=False)
                xen.shutdown(name)
        guest.config.unlink(missing_ok=True)
        remove_volume_group(VG, disk)
