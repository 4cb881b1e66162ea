"""A VM's disks found in its domain definition, each mapped to the LV it lives on.

The hypervisor names a disk by whatever path its admin wrote: /dev/VG/LV, /dev/mapper/VG-LV, /dev/dm-N,
/dev/disk/by-id/dm-..., an image file, or a loop device serving one. All of these are compared by device
number with `lvs -o lv_kernel_major,lv_kernel_minor`, never by spelling.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from . import mount
from .lvm import LogicalVolume, Lvm
from .model import VM, Disk, DiskMode, DomainDisk
from .run import CommandError, run

log = logging.getLogger(__name__)

LOOP_MAJOR = 7

DevNum = tuple[int, int]


class DiscoveryError(Exception):
    """A disk of the domain cannot be backed up as it is; .problems has one line per disk."""

    def __init__(self, vm: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(f"cannot back up the disks of {vm}: " + "; ".join(self.problems))


@dataclass(frozen=True)
class PathFacts:
    """What the kernel says a disk path is."""

    block: DevNum | None = None
    """The device number of a block device."""
    filesystem: DevNum | None = None
    """The device of the filesystem holding a regular file."""
    realpath: str = ""


class Probe(Protocol):
    def facts(self, path: str) -> PathFacts | None: ...
    def loop_backing_file(self, device: DevNum) -> str | None: ...
    def mountpoint(self, device: DevNum) -> str | None: ...


class SystemProbe:
    """Answers the Probe's questions from stat(2), `losetup --json` and /proc/self/mountinfo."""

    def __init__(self, losetup: str = "losetup", mountinfo: str = "/proc/self/mountinfo") -> None:
        self.losetup = losetup
        self.mountinfo = mountinfo

    def facts(self, path: str) -> PathFacts | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        real = os.path.realpath(path)
        if stat.S_ISBLK(st.st_mode):
            return PathFacts(block=(os.major(st.st_rdev), os.minor(st.st_rdev)), realpath=real)
        if stat.S_ISREG(st.st_mode):
            return PathFacts(filesystem=(os.major(st.st_dev), os.minor(st.st_dev)), realpath=real)
        return PathFacts(realpath=real)

    def loop_backing_file(self, device: DevNum) -> str | None:
        try:
            out = run([self.losetup, "--json", "--list", "--output", "NAME,MAJ:MIN,BACK-FILE"])
        except CommandError as err:
            log.warning("cannot list loop devices: %s", err)
            return None
        return parse_losetup(out.stdout).get(device)

    def mountpoint(self, device: DevNum) -> str | None:
        try:
            with open(self.mountinfo, encoding="utf-8") as f:
                return parse_mountinfo(f.read()).get(device)
        except OSError:
            return None


def parse_losetup(stdout: str) -> dict[DevNum, str]:
    """`losetup --json --list --output NAME,MAJ:MIN,BACK-FILE` → backing file by device number."""
    import json

    out: dict[DevNum, str] = {}
    try:
        rows = json.loads(stdout or "{}").get("loopdevices", [])
    except (ValueError, AttributeError):
        return out
    for row in rows:
        if not isinstance(row, dict):
            continue
        majmin = str(row.get("maj:min", ""))
        back = str(row.get("back-file") or "")
        if ":" in majmin and back:
            major, minor = majmin.split(":", 1)
            out[(int(major), int(minor))] = back.removesuffix(" (deleted)")
    return out


def parse_mountinfo(text: str) -> dict[DevNum, str]:
    """Where each device's whole filesystem (root "/") is mounted; the first mount wins."""
    out: dict[DevNum, str] = {}
    for entry in mount.parse_mountinfo(text):
        major, sep, minor = entry.devnum.partition(":")
        if sep and entry.root == "/":
            out.setdefault((int(major), int(minor)), entry.target)
    return out


def resolve(vm: VM, domain_disks: Sequence[DomainDisk], lvs: Sequence[LogicalVolume], probe: Probe) -> tuple[Disk, ...]:
    """Map the domain's disks to Disks: block mode for a disk on an LV, files mode for images on an LV's
    filesystem (one snapshot per LV however many images it holds). Every problem is reported at once."""
    by_dev: Mapping[DevNum, LogicalVolume] = {lv.devnum: lv for lv in lvs if lv.devnum is not None}
    block: dict[str, Disk] = {}
    files: dict[str, tuple[LogicalVolume, list[str], list[str]]] = {}
    problems: list[str] = []
    order: list[str] = []
    for d in domain_disks:
        if d.target in vm.exclude:
            log.info("disk %s of %s is excluded by the config", d.target, vm.name)
            continue
        if d.cdrom:
            log.info("skipping CD-ROM %s of %s", d.target, vm.name)
            continue
        if d.network:
            problems.append(f"disk {d.target} is served over {d.network} ({d.source}), not from an LVM logical "
                            f"volume on this host; add \"{d.target}\" to exclude to skip it")
            continue
        if not d.source:
            problems.append(f"disk {d.target} has no source path")
            continue
        facts = probe.facts(d.source)
        if facts is None:
            problems.append(f"disk {d.target}: {d.source} does not exist")
            continue
        image = None
        if facts.block is not None and facts.block[0] == LOOP_MAJOR:
            image = probe.loop_backing_file(facts.block)
            if image is None:
                problems.append(f"disk {d.target}: loop device {d.source} has no backing file")
                continue
            facts = probe.facts(image)
            if facts is None or facts.filesystem is None:
                problems.append(f"disk {d.target}: {image}, the backing file of {d.source}, is not a regular file")
                continue
        if facts.block is not None:
            lv = by_dev.get(facts.block)
            if lv is None:
                problems.append(f"disk {d.target} ({d.source}) is not an LVM logical volume; add \"{d.target}\" "
                                "to exclude to skip it")
                continue
            key = str(lv.ref)
            if key in files:
                problems.append(f"disk {d.target}: {lv.ref} holds image files of this VM and is its disk too")
                continue
            if key not in block:
                order.append(key)
                block[key] = Disk(lv=lv.ref, mode=DiskMode.BLOCK, mount_options=vm.mount_options,
                                  source=f"{d.target}: {d.source}")
            continue
        if facts.filesystem is None:
            problems.append(f"disk {d.target}: {d.source} is neither a block device nor a regular file")
            continue
        lv = by_dev.get(facts.filesystem)
        if lv is None:
            problems.append(f"disk {d.target}: the filesystem holding {image or d.source} is not on an LVM "
                            f"logical volume; add \"{d.target}\" to exclude to skip it")
            continue
        mountpoint = probe.mountpoint(facts.filesystem)
        if mountpoint is None:
            problems.append(f"disk {d.target}: cannot find where {lv.ref} is mounted")
            continue
        key = str(lv.ref)
        if key in block:
            problems.append(f"disk {d.target}: {lv.ref} is a disk of this VM and holds its image files too")
            continue
        rel = os.path.relpath(os.path.dirname(facts.realpath), mountpoint)
        if key not in files:
            order.append(key)
            files[key] = (lv, [], [])
        files[key][1].append(rel)
        files[key][2].append(f"{d.target}: {image or d.source}")
    if problems:
        raise DiscoveryError(vm.name, problems)
    out: list[Disk] = []
    for key in order:
        if key in block:
            out.append(block[key])
        else:
            lv, dirs, sources = files[key]
            out.append(Disk(lv=lv.ref, mode=DiskMode.FILES, path=os.path.normpath(os.path.commonpath(dirs)),
                            mount_options=vm.mount_options, source=", ".join(sources)))
    if not out:
        raise DiscoveryError(vm.name, ["its definition names no disk to back up (all are CD-ROMs or excluded)"])
    return tuple(out)


def discover(vm: VM, hypervisor: DomainReader, lvm: Lvm, probe: Probe,
             volumes: Sequence[LogicalVolume] | None = None) -> tuple[Disk, ...]:
    """The VM's disks: as configured, or else read from its domain definition (mapped onto `volumes`, the
    LVs the caller's `lvs` saw, else onto what LVM lists now)."""
    if not vm.discovers_disks:
        return vm.disks
    domain_disks = hypervisor.disks(vm.name, vm.domain_config)
    return resolve(vm, domain_disks, lvm.all() if volumes is None else list(volumes), probe)


class DomainReader(Protocol):
    def disks(self, name: str, domain_config: str | None) -> list[DomainDisk]: ...
