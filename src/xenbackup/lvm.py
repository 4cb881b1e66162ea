"""LVM adapter: JSON reports from lvs/vgs, and lvcreate/lvextend/lvremove."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .model import LvRef, SnapshotSize
from .run import CommandError, run

log = logging.getLogger(__name__)

LV_FIELDS = ("lv_name,vg_name,lv_attr,lv_size,origin,origin_size,snap_percent,data_percent,"
             "metadata_percent,lv_tags,pool_lv,lv_path,lv_kernel_major,lv_kernel_minor")
VG_FIELDS = "vg_name,vg_size,vg_free,vg_extent_size"
# A VG's own fields beside each of its LVs: one `lvs` answers what `lvs` and `vgs` answered in two.
VG_FIELDS_PER_LV = "vg_size,vg_free,vg_extent_size"


class LvmError(Exception):
    pass


class MalformedReport(LvmError):
    def __init__(self, command: str, what: str) -> None:
        super().__init__(f"{command} printed a report xenbackup cannot read: {what}")


@dataclass(frozen=True)
class LogicalVolume:
    vg: str
    name: str
    attr: str
    size: int
    origin: str
    origin_size: int
    snap_percent: float | None
    data_percent: float | None
    metadata_percent: float | None
    tags: tuple[str, ...]
    pool: str
    # The device number of an active LV (-1 when inactive): the one way to recognise it behind any path.
    kernel_major: int = -1
    kernel_minor: int = -1

    @property
    def devnum(self) -> tuple[int, int] | None:
        return (self.kernel_major, self.kernel_minor) if self.kernel_major >= 0 else None

    @property
    def ref(self) -> LvRef:
        return LvRef(self.vg, self.name)

    @property
    def is_thin(self) -> bool:
        return self.attr[:1] == "V"

    @property
    def is_classic_snapshot(self) -> bool:
        return self.attr[:1] in ("s", "S")

    @property
    def is_invalid(self) -> bool:
        """A classic snapshot that overflowed: LVM marks it (I)nvalid or type (S)."""
        return self.attr[:1] == "S" or self.attr[4:5] in ("I", "S")

    @property
    def is_active(self) -> bool:
        return self.attr[4:5] == "a"

    @property
    def is_open(self) -> bool:
        return self.attr[5:6] == "o"

    @property
    def fill(self) -> float | None:
        """Percent used: COW for classic snapshots, data for thin volumes."""
        return self.snap_percent if self.is_classic_snapshot else self.data_percent


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    size: int
    free: int
    extent_size: int


def _num(value: Any) -> int:
    text = str(value).strip().rstrip("Bb")
    return int(float(text)) if text else 0


def _pct(value: Any) -> float | None:
    text = str(value).strip()
    return float(text) if text else None


def _devnum_part(value: Any) -> int:
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else -1


def _rows(command: str, stdout: str, kind: str) -> list[Mapping[str, Any]]:
    try:
        data = json.loads(stdout)
        rows = [row for report in data["report"] for row in report.get(kind, [])]
    except (ValueError, KeyError, TypeError) as exc:
        raise MalformedReport(command, f"{type(exc).__name__}: {exc}") from None
    if not all(isinstance(r, dict) for r in rows):
        raise MalformedReport(command, f"'{kind}' entries are not objects")
    return rows


def _lv_of(row: Mapping[str, Any]) -> LogicalVolume:
    return LogicalVolume(
        vg=row["vg_name"], name=row["lv_name"], attr=row["lv_attr"], size=_num(row["lv_size"]),
        origin=row.get("origin", ""), origin_size=_num(row.get("origin_size", "")),
        snap_percent=_pct(row.get("snap_percent", "")),
        data_percent=_pct(row.get("data_percent", "")),
        metadata_percent=_pct(row.get("metadata_percent", "")),
        tags=tuple(t for t in str(row.get("lv_tags", "")).split(",") if t),
        pool=row.get("pool_lv", ""),
        kernel_major=_devnum_part(row.get("lv_kernel_major", "")),
        kernel_minor=_devnum_part(row.get("lv_kernel_minor", "")),
    )


def parse_lvs(stdout: str) -> list[LogicalVolume]:
    """Parse `lvs --reportformat json --units b --nosuffix -o LV_FIELDS` output."""
    out = []
    for row in _rows("lvs", stdout, "lv"):
        try:
            out.append(_lv_of(row))
        except (KeyError, ValueError) as exc:
            raise MalformedReport("lvs", f"bad row {row!r}: {exc}") from None
    return out


def parse_vgs(stdout: str) -> list[VolumeGroup]:
    out = []
    for row in _rows("vgs", stdout, "vg"):
        try:
            out.append(VolumeGroup(row["vg_name"], _num(row["vg_size"]), _num(row["vg_free"]),
                                   _num(row["vg_extent_size"])))
        except (KeyError, ValueError) as exc:
            raise MalformedReport("vgs", f"bad row {row!r}: {exc}") from None
    return out


@dataclass(frozen=True)
class Overview:
    """Every LV, and each VG that holds one, as one `lvs` saw them: what a run checks before its window.

    Each `lvs` or `vgs` scans every PV's metadata; one scan here replaces a sweep's, an origin's and a VG's."""

    volumes: tuple[LogicalVolume, ...]
    groups: tuple[VolumeGroup, ...]

    def lv(self, ref: LvRef) -> LogicalVolume | None:
        return next((lv for lv in self.volumes if lv.ref == ref), None)

    def tagged(self, tag: str) -> list[LogicalVolume]:
        return [lv for lv in self.volumes if tag in lv.tags]

    def vg(self, name: str) -> VolumeGroup:
        found = next((vg for vg in self.groups if vg.name == name), None)
        if found is None:
            raise LvmError(f"volume group {name} not found")
        return found


def parse_overview(stdout: str) -> Overview:
    """Parse `lvs ... -o LV_FIELDS,VG_FIELDS_PER_LV` of every LV."""
    volumes: list[LogicalVolume] = []
    groups: dict[str, VolumeGroup] = {}
    for row in _rows("lvs", stdout, "lv"):
        try:
            volumes.append(_lv_of(row))
            groups.setdefault(row["vg_name"], VolumeGroup(row["vg_name"], _num(row["vg_size"]), _num(row["vg_free"]),
                                                          _num(row["vg_extent_size"])))
        except (KeyError, ValueError) as exc:
            raise MalformedReport("lvs", f"bad row {row!r}: {exc}") from None
    return Overview(tuple(volumes), tuple(groups.values()))


@dataclass(frozen=True)
class SnapshotStatus:
    """A classic snapshot's fill as the kernel counts it (`dmsetup status`)."""

    used_sectors: int
    total_sectors: int
    invalid: bool

    @property
    def fill(self) -> float:
        if self.invalid:
            return 100.0
        return 100.0 * self.used_sectors / self.total_sectors if self.total_sectors else 0.0


def dm_name(ref: LvRef) -> str:
    """The device-mapper name LVM gives an LV: '-' inside a name doubled, VG and LV joined by '-'."""
    return f"{ref.vg.replace('-', '--')}-{ref.name.replace('-', '--')}"


def parse_snapshot_status(stdout: str) -> SnapshotStatus:
    """Parse `dmsetup status NAME` of a classic snapshot: "0 LEN snapshot USED/TOTAL META", or
    "Invalid"/"Overflow"/"Merge failed" once the kernel gave up on it."""
    for line in stdout.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[2] != "snapshot":
            continue
        state = fields[3]
        if "/" not in state:
            return SnapshotStatus(0, 0, invalid=True)
        used, _, total = state.partition("/")
        try:
            return SnapshotStatus(int(used), int(total), invalid=False)
        except ValueError:
            raise MalformedReport("dmsetup status", f"bad snapshot counters {state!r}") from None
    raise MalformedReport("dmsetup status", f"no snapshot target in {stdout.strip()!r}")


def is_missing(err: CommandError) -> bool:
    text = err.stderr.lower()
    return "failed to find logical volume" in text or ("not found" in text and "volume group" in text)


_Lv = TypeVar("_Lv")


def one_lv(lvs: Callable[[str], list[_Lv]], ref: LvRef) -> _Lv | None:
    """The one LV `lvs REF` reports, or None when LVM says it does not exist."""
    try:
        found = lvs(str(ref))
    except CommandError as err:
        if is_missing(err):
            return None
        raise
    return found[0] if found else None


def is_in_use(err: CommandError) -> bool:
    text = err.stderr.lower()
    return "in use" in text or "is open" in text or "device or resource busy" in text


def is_target_loading(err: CommandError) -> bool:
    """LVM found no device-mapper target for the segment type: after a boot, several classic snapshots made at
    once race LVM's own loading of dm-snapshot, and the commands that lose see no target until the module
    is live, moments later."""
    return "required device-mapper target(s) not detected" in err.stderr.lower()


TARGET_WAITS = (0.5, 1.0, 2.0)
"""Seconds between lvcreate's attempts while a kernel module is still loading; LVM checks for the target
before it changes any metadata, so a failed attempt left nothing behind."""


class Lvm:
    def __init__(self, commands: Mapping[str, str], sleep: Callable[[float], None] = time.sleep,
                 monitor: bool = False) -> None:
        self.cmd = commands
        self.sleep = sleep
        self.monitor = monitor

    def lvs_argv(self, selection: Sequence[str], fields: str = LV_FIELDS) -> list[str]:
        return [self.cmd["lvs"], "--reportformat", "json", "--units", "b", "--nosuffix",
                "-o", fields, *selection]

    def overview_argv(self) -> list[str]:
        return self.lvs_argv((), f"{LV_FIELDS},{VG_FIELDS_PER_LV}")

    def overview(self) -> Overview:
        return parse_overview(run(self.overview_argv()).stdout)

    def lvs(self, *selection: str) -> list[LogicalVolume]:
        return parse_lvs(run(self.lvs_argv(selection)).stdout)

    def lv(self, ref: LvRef) -> LogicalVolume | None:
        return one_lv(self.lvs, ref)

    def all(self) -> list[LogicalVolume]:
        return self.lvs()

    def tagged(self, tag: str) -> list[LogicalVolume]:
        """Every LV carrying the tag; only these may ever be removed by cleanup."""
        return self.lvs(f"@{tag}")

    def vg(self, name: str) -> VolumeGroup:
        argv = [self.cmd["vgs"], "--reportformat", "json", "--units", "b", "--nosuffix", "-o", VG_FIELDS, name]
        found = parse_vgs(run(argv).stdout)
        if not found:
            raise LvmError(f"volume group {name} not found")
        return found[0]

    def create_snapshot_argv(self, origin: LvRef, name: str, size: SnapshotSize | None,
                             tags: Sequence[str]) -> list[str]:
        argv = [self.cmd["lvcreate"], "--snapshot", "--name", name]
        if size is not None:
            argv += size.lvcreate_args()
            if not self.monitor:
                # dmeventd's registration runs after lvcreate has started the copy-on-write, and costs the
                # VM's writes 0.25-0.6 s under emulation (bench/lvprobe-in-guest.sh). The backup step's
                # overflow guard watches and extends the snapshot itself while restic reads it.
                argv += ["--monitor", "n"]
        else:
            # Thin snapshots get the activation-skip flag by default; we want it active to read it.
            argv += ["--setactivationskip", "n"]
        for tag in tags:
            argv += ["--addtag", tag]
        return [*argv, str(origin)]

    def create_snapshot(self, origin: LvRef, name: str, size: SnapshotSize | None,
                        tags: Sequence[str]) -> LvRef:
        argv = self.create_snapshot_argv(origin, name, size, tags)
        for delay in (*TARGET_WAITS, None):
            try:
                run(argv)
                break
            except CommandError as err:
                if delay is None or not is_target_loading(err):
                    raise
                log.warning("the kernel has no device-mapper target for %s's snapshot yet (its module is "
                            "still loading); retrying lvcreate in %.1f s", origin, delay)
                self.sleep(delay)
        return LvRef(origin.vg, name)

    def extend_argv(self, ref: LvRef, step: SnapshotSize) -> list[str]:
        if step.kind.value == "bytes":
            size = ["--size", f"+{step.amount}b"]
        else:
            size = ["--extents", f"+{step.amount}%{step.kind.value}"]
        return [self.cmd["lvextend"], *size, str(ref)]

    def extend(self, ref: LvRef, step: SnapshotSize) -> None:
        run(self.extend_argv(ref, step))

    def remove_argv(self, ref: LvRef) -> list[str]:
        return [self.cmd["lvremove"], "--yes", str(ref)]

    def remove(self, ref: LvRef, retries: int = 6) -> bool:
        """Remove an LV; False if it was already gone. Retries the well-known 'in use' race."""
        delay = 0.5
        for attempt in range(retries + 1):
            try:
                run(self.remove_argv(ref))
                return True
            except CommandError as err:
                if is_missing(err):
                    return False
                if not is_in_use(err) or attempt == retries:
                    raise
                log.warning("%s is still in use, retrying lvremove in %.1f s", ref, delay)
                self.settle()
                self.sleep(delay)
                delay = min(delay * 2, 8.0)
        return False

    def snapshot_status(self, ref: LvRef) -> SnapshotStatus | None:
        """The kernel's counters for one classic snapshot; None if its device is gone.

        The overflow watch asks every few seconds: `lvs` would scan every PV's metadata each time.
        """
        try:
            out = run([self.cmd["dmsetup"], "status", dm_name(ref)])
        except CommandError as err:
            if "no such device" in err.stderr.lower() or "not exist" in err.stderr.lower():
                return None
            raise
        return parse_snapshot_status(out.stdout)

    def wait_for(self, paths: Sequence[str]) -> None:
        """Wait until udev has made these device links: only them, where `udevadm settle` waits for every event."""
        # lvcreate waits for udev to finish its events (LVM's udev_sync), so the links are usually there: then
        # no process is spawned inside the snapshot's life for them.
        if all(os.path.exists(path) for path in paths):
            return
        with contextlib.suppress(CommandError):
            if run([self.cmd["udevadm"], "wait", "--timeout=10", *paths], check=False).returncode == 0:
                return
        # udevadm before systemd 251 has no `wait`.
        self.settle()

    def settle(self) -> None:
        # udev creates /dev/VG/LV links for a new snapshot asynchronously; without udevadm there is nothing to wait for.
        with contextlib.suppress(CommandError):
            run([self.cmd["udevadm"], "settle", "--timeout=10"], check=False)
