"""The domain: virtual machines, disks, snapshot specs and run plans. No I/O here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from . import names

VM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,62}$")
LV_NAME_RE = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$")
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B?)?\s*$", re.IGNORECASE)
PERCENT_RE = re.compile(r"^\s*(\d{1,3})\s*%\s*(ORIGIN|VG|FREE)\s*$", re.IGNORECASE)
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


class DiskMode(StrEnum):
    FILES = "files"
    BLOCK = "block"


class HypervisorKind(StrEnum):
    XEN = "xen"
    KVM = "kvm"
    NONE = "none"


class Consistency(StrEnum):
    """How a VM's disks are made to look like one instant while their snapshots are taken."""

    AUTO = "auto"
    PAUSE = "pause"
    FREEZE = "freeze"
    NONE = "none"


class SizeKind(StrEnum):
    BYTES = "bytes"
    ORIGIN = "ORIGIN"
    VG = "VG"
    FREE = "FREE"


@dataclass(frozen=True)
class SnapshotSize:
    """A classic snapshot's COW size: absolute bytes or a percentage of origin, VG or free space."""

    amount: int
    kind: SizeKind = SizeKind.BYTES

    @classmethod
    def parse(cls, text: str) -> SnapshotSize:
        pct = PERCENT_RE.match(text)
        if pct:
            value = int(pct.group(1))
            if not 1 <= value <= 100:
                raise ValueError(f"percentage must be 1..100, got {value}")
            return cls(value, SizeKind(pct.group(2).upper()))
        return cls(parse_bytes(text))

    def lvcreate_args(self) -> list[str]:
        if self.kind is SizeKind.BYTES:
            return ["--size", f"{self.amount}b"]
        return ["--extents", f"{self.amount}%{self.kind.value}"]

    def bytes_needed(self, origin_size: int, vg_size: int, vg_free: int) -> int:
        base = {SizeKind.ORIGIN: origin_size, SizeKind.VG: vg_size, SizeKind.FREE: vg_free}
        if self.kind is SizeKind.BYTES:
            return self.amount
        return base[self.kind] * self.amount // 100

    def __str__(self) -> str:
        if self.kind is SizeKind.BYTES:
            return format_bytes(self.amount)
        return f"{self.amount}%{self.kind.value}"


def parse_bytes(text: str) -> int:
    m = SIZE_RE.match(text)
    if not m:
        raise ValueError(f'expected a size like "10G" or "20%ORIGIN", got {text!r}')
    number, unit = float(m.group(1)), m.group(2).upper()
    value = int(number * UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class LvRef:
    vg: str
    name: str

    @classmethod
    def parse(cls, text: str) -> LvRef:
        text = text.strip()
        if text.startswith("/dev/"):
            text = text[len("/dev/"):]
        parts = text.split("/")
        if len(parts) != 2 or not all(LV_NAME_RE.match(p) for p in parts):
            raise ValueError(f'expected "VG/LV" such as "system/xenvm", got {text!r}')
        return cls(parts[0], parts[1])

    @property
    def path(self) -> str:
        return f"/dev/{self.vg}/{self.name}"

    def __str__(self) -> str:
        return f"{self.vg}/{self.name}"


@dataclass(frozen=True)
class Disk:
    lv: LvRef
    mode: DiskMode
    # Inside the filesystem, the directory (or file) to back up in files mode.
    path: str = "."
    mount_options: tuple[str, ...] = ()
    # Where the disk came from: "config", or the domain's device and its path when discovered.
    source: str = "config"

    @property
    def slug(self) -> str:
        """A stable name for this disk, used for mount points and restic tags."""
        return f"{self.lv.vg}-{self.lv.name}"


@dataclass(frozen=True)
class Retention:
    keep_last: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None

    def forget_args(self) -> list[str]:
        args: list[str] = []
        for name in ("keep_last", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly"):
            value = getattr(self, name)
            if value is not None:
                args += [f"--{name.replace('_', '-')}", str(value)]
        return args


@dataclass(frozen=True)
class VM:
    name: str
    disks: tuple[Disk, ...]
    hypervisor: HypervisorKind = HypervisorKind.XEN
    domain_config: str | None = None
    snapshot_size: SnapshotSize = SnapshotSize(20, SizeKind.ORIGIN)
    schedule: str | None = None
    randomized_delay: str | None = None
    retention: Retention = field(default_factory=Retention)
    overflow_threshold: int = 80
    extend_step: SnapshotSize = SnapshotSize(10, SizeKind.ORIGIN)
    pool_threshold: int = 95
    consistency: Consistency = Consistency.AUTO
    max_pause: int = 10
    exclude: tuple[str, ...] = ()
    mount_options: tuple[str, ...] = ()

    @property
    def discovers_disks(self) -> bool:
        """No `disks` in the config: they come from the domain's definition at run time."""
        return not self.disks

    @property
    def unit(self) -> str:
        return names.service(self.name)

    @property
    def lv_tag(self) -> str:
        """The LVM tag every snapshot of this VM carries; cleanup deletes only what has it."""
        return names.lv_vm_tag(self.name)


def snapshot_name(vm: str, disk: Disk, stamp: str) -> str:
    return names.snapshot_lv(vm, disk.lv.name, stamp)


@dataclass(frozen=True)
class SnapshotRecord:
    """A snapshot this run created, as recorded in the run state."""

    origin: LvRef
    name: str
    disk_slug: str
    thin: bool = False
    mountpoint: str | None = None

    @property
    def lv(self) -> LvRef:
        return LvRef(self.origin.vg, self.name)


@dataclass(frozen=True)
class DomainDisk:
    """One disk as the hypervisor's own definition of the domain names it."""

    target: str
    """The guest's device name: xvda, vdb, hdc."""
    source: str
    """A block device or image file path; "" for an empty CD-ROM drive."""
    cdrom: bool = False
    network: str = ""
    """A disk served over the network (rbd, iscsi, nbd): its protocol; it cannot be snapshotted here."""


@dataclass(frozen=True)
class PlannedCommand:
    phase: str
    argv: tuple[str, ...]
    note: str = ""
