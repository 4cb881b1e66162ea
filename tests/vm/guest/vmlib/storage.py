"""Blank disks, volume groups, filesystems and the seed manual's layout.

The seed manual (SEP sesam, "Online Sicherung von virtuellen XEN Maschinen")
keeps VM vm1 on LV /dev/system/xenvm, mounted at /srv/xenvm, with the VM's
files in /srv/xenvm/vm1. `create_seed_layout` builds exactly that on a blank
disk, and `remove_volume_group` takes it all down again.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from .cmd import CommandFailed, output, run, tree_hashes
from .xen import write_seed_vm_files

BLANK_DISKS = tuple(Path(f"/dev/disk/by-id/virtio-xbtest{n}") for n in (1, 2, 3))
"""The host attaches three sparse 4 GiB disks; nothing is on them at boot."""

SEED_VG = "system"
SEED_LV = "xenvm"
SEED_MOUNTPOINT = Path("/srv/xenvm")
SEED_VM = "vm1"
FILESYSTEMS = ("ext4", "xfs")

VM_IMAGE_SIZE = 8 * 2**20
"""vm1's disk image. restic stores about 7 MiB/s in the one-vCPU TCG guest, and the seed layout is made again
for most tests and backed up several times in each, so every MiB here costs seconds per test. Tests that
need restic busy for a while add ballast of their own."""


def wait_for_disks(disks: tuple[Path, ...] = BLANK_DISKS, timeout: float = 60) -> None:
    """Wait until udev has made the by-id links of the blank disks."""
    run("udevadm", "settle", "--timeout=60", timeout=90, check=False)
    deadline = time.monotonic() + timeout
    while missing := [disk for disk in disks if not disk.exists()]:
        if time.monotonic() > deadline:
            raise AssertionError(f"blank disks missing after {timeout:.0f}s: {', '.join(map(str, missing))}")
        time.sleep(0.5)


def wipe_disk(disk: Path) -> None:
    """Remove every signature and the first MiB, so the disk is blank again."""
    run("wipefs", "--all", "--force", disk)
    with open(disk, "r+b") as device:
        device.write(bytes(2**20))
        os.fsync(device.fileno())
    run("udevadm", "settle", "--timeout=30", timeout=60, check=False)


def make_filesystem(device: Path, fstype: str, label: str | None = None) -> None:
    if fstype not in FILESYSTEMS:
        raise ValueError(f"unsupported filesystem {fstype!r}; expected one of {FILESYSTEMS}")
    argv = ["mkfs.ext4", "-q", "-F"] if fstype == "ext4" else ["mkfs.xfs", "-q", "-f"]
    if label:
        argv += ["-L", label]
    run(*argv, device, timeout=300)


def snapshot_mount_options(fstype: str) -> str:
    """Read-only mount options for a snapshot of a live filesystem.

    xfs refuses a second mount of the same UUID, so snapshots need nouuid; a
    snapshot of a mounted filesystem has a dirty log, and replaying it would
    write, so norecovery (xfs) and noload (ext4).
    """
    return "ro,nouuid,norecovery" if fstype == "xfs" else "ro,noload"


def mount(device: Path, mountpoint: Path, options: str | None = None) -> None:
    mountpoint.mkdir(parents=True, exist_ok=True)
    run("mount", *(["-o", options] if options else []), device, mountpoint, timeout=120)


def umount(mountpoint: Path) -> None:
    """Unmount if mounted (lazy unmount only as a last resort)."""
    if run("mountpoint", "-q", mountpoint, check=False).returncode != 0:
        return
    if run("umount", mountpoint, timeout=120, check=False).returncode != 0:
        run("umount", "--lazy", mountpoint, timeout=60)


def mounts_of_volume_group(vg: str) -> list[Path]:
    """Mount points of every LV of a VG, deepest first."""
    prefix = vg.replace("-", "--") + "-"
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        source, target = line.split()[:2]
        name = Path(os.path.realpath(source)).name
        with suppress(OSError):
            if name.startswith("dm-") and Path(f"/sys/block/{name}/dm/name").read_text().startswith(prefix):
                points.append(Path(target.replace("\\040", " ")))
    return sorted(points, key=lambda p: len(p.parts), reverse=True)


def create_volume_group(vg: str, disk: Path) -> None:
    run("pvcreate", "--yes", "--force", disk)
    run("vgcreate", "--yes", vg, disk)


def remove_volume_group(vg: str, disk: Path | None = None) -> None:
    """Unmount and remove every LV and the VG; then clear `disk` (PV label, signatures)."""
    for mountpoint in mounts_of_volume_group(vg):
        umount(mountpoint)
    if run("vgs", vg, check=False).returncode == 0:
        run("vgchange", "--activate", "n", vg, timeout=120, check=False)
        run("lvremove", "--yes", "--force", "--force", vg, timeout=180, check=False)
        run("vgremove", "--yes", "--force", "--force", vg, timeout=120)
    if disk is not None:
        clear_disk(disk)


def clear_disk(disk: Path) -> None:
    """Remove whatever was built on a disk (its VG, the PV) and wipe it blank."""
    device = os.path.realpath(disk)
    pv = run("pvs", "--noheadings", "-o", "vg_name", device, check=False)
    if pv.returncode == 0:
        vg = pv.stdout.strip()
        if vg:
            remove_volume_group(vg)
        run("pvremove", "--yes", "--force", "--force", device)
    wipe_disk(disk)


def vg_free_bytes(vg: str) -> int:
    return int(output("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_free", vg))


def write_vm_image(path: Path, marker: str, size: int = VM_IMAGE_SIZE, body: bytes | None = None) -> None:
    """A disk image whose first line is `marker`, the rest `body` or, without one, random data."""
    head = marker.encode() + b"\n"
    if body is None:
        body = os.urandom(size - len(head))
    assert len(head) + len(body) == size, f"an image of {size} bytes cannot hold {len(body)} after {head!r}"
    with open(path, "wb") as image:
        image.write(head + body)
        os.fsync(image.fileno())


@dataclass(frozen=True)
class SeedLayout:
    """VG `system`, LV `xenvm` mounted at /srv/xenvm, vm1's files in /srv/xenvm/vm1."""

    fstype: str
    disk: Path
    marker: str
    """The first line of vm1's disk image, which the PV guest prints when it boots."""
    files: dict[str, str] = field(default_factory=dict)
    """sha256 of each file in vmdir when the layout was made, by relative path."""
    vg: str = SEED_VG
    lv: str = SEED_LV
    mountpoint: Path = SEED_MOUNTPOINT
    vm: str = SEED_VM

    @property
    def device(self) -> Path:
        return Path(f"/dev/{self.vg}/{self.lv}")

    @property
    def vmdir(self) -> Path:
        return self.mountpoint / self.vm

    @property
    def image(self) -> Path:
        """vm1's disk: a raw file of random data behind a marker line."""
        return self.vmdir / "disk.img"

    @property
    def config(self) -> Path:
        """vm1's xl config (see vmlib.xen.write_seed_vm_files)."""
        return self.vmdir / f"{self.vm}.cfg"


SEED_LV_SIZE = "1G"
SEED_LV_BYTES = 2**30


def create_seed_layout(fstype: str = "ext4", disk: Path = BLANK_DISKS[0], lv_size: str = SEED_LV_SIZE) -> SeedLayout:
    """Build the seed manual's layout on a blank disk, leaving the rest of the VG free for snapshots."""
    wait_for_disks((disk,))
    create_volume_group(SEED_VG, disk)
    run("lvcreate", "--yes", "--wipesignatures", "y", "-L", lv_size, "-n", SEED_LV, SEED_VG)
    device = Path(f"/dev/{SEED_VG}/{SEED_LV}")
    make_filesystem(device, fstype)
    mount(device, SEED_MOUNTPOINT)
    return _write_seed_files(fstype, disk)


@functools.cache
def _seed_content() -> tuple[str, bytes]:
    """vm1's marker and the random data of its image, made once per pytest session. Every seed layout of a
    session holds the same files, so a test whose first backup of them is the same as an earlier test's can
    take a copy of that test's repository instead (the fault matrix's baseline)."""
    marker = f"XBMARKER {SEED_VM} {secrets.token_hex(8)}"
    return marker, os.urandom(VM_IMAGE_SIZE - len(marker.encode()) - 1)


def _write_seed_files(fstype: str, disk: Path) -> SeedLayout:
    vmdir = SEED_MOUNTPOINT / SEED_VM
    vmdir.mkdir()
    marker, body = _seed_content()
    write_vm_image(vmdir / "disk.img", marker, body=body)
    write_seed_vm_files(vmdir, SEED_VM, vmdir / "disk.img")
    run("sync")
    return SeedLayout(fstype=fstype, disk=disk, marker=marker, files=tree_hashes(vmdir))


_KEPT: dict[Path, str] = {}
"""Seed layouts a test left in place (disk -> fstype), for the next test that asks for the same one."""


def _seed_layout_intact(fstype: str, disk: Path) -> bool:
    """The layout as create_seed_layout leaves it: the one PV, LV `xenvm` alone, untagged, at its size, with
    no snapshot, mounted read-write at its place and nowhere else."""
    if _KEPT.get(disk) != fstype:
        return False
    report = run("lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o",
                 "lv_name,lv_size,lv_attr,lv_tags,devices", SEED_VG, check=False)
    if report.returncode != 0:
        return False
    lvs = [lv for lv in json.loads(report.stdout)["report"][0]["lv"] if lv]
    device = os.path.realpath(disk)
    if [(lv["lv_name"], int(lv["lv_size"]), lv["lv_attr"][:6], lv["lv_tags"], lv["devices"].split("(")[0])
            for lv in lvs] != [(SEED_LV, SEED_LV_BYTES, "-wi-ao", "", device)]:
        return False
    mounted = run("findmnt", "--noheadings", "--output", "SOURCE,FSTYPE,OPTIONS", SEED_MOUNTPOINT, check=False)
    source, found_fstype, options = [*mounted.stdout.split(), "", "", ""][:3]
    return (mounts_of_volume_group(SEED_VG) == [SEED_MOUNTPOINT] and source == f"/dev/mapper/{SEED_VG}-{SEED_LV}"
            and found_fstype == fstype and "rw" in options.split(","))


def _reset_seed_layout(fstype: str, disk: Path) -> SeedLayout | None:
    """The kept layout with vm1's files written anew, or None when it is not as it was made."""
    if not _seed_layout_intact(fstype, disk):
        return None
    try:
        for child in SEED_MOUNTPOINT.iterdir():
            if child.name == "lost+found":
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    except OSError:
        return None
    return _write_seed_files(fstype, disk)


@contextmanager
def seed_layout(fstype: str = "ext4", disk: Path = BLANK_DISKS[0]) -> Iterator[SeedLayout]:
    """The seed layout for the duration of a with-block.

    The VG, the LV and its filesystem stay for the next with-block that asks for the same filesystem, and
    that one gets vm1's files written anew (the same bytes all session, see _seed_content): about 20 LVM,
    udev and mkfs calls fewer per test, which took 10-20 s of setup and teardown under TCG. Whatever a test
    left otherwise (another LV, a snapshot, a tag, a mount, a resize, a different filesystem) is found by
    `_seed_layout_intact`, and the layout is then built from a blank disk as before. `release_kept_layouts`
    takes a kept layout down.
    """
    layout = _reset_seed_layout(fstype, disk)
    if layout is None:
        _KEPT.pop(disk, None)
        remove_volume_group(SEED_VG)  # leftovers of a crashed run, or of the test before
        clear_disk(disk)
        layout = create_seed_layout(fstype, disk)
    _KEPT[disk] = fstype
    yield layout


def release_kept_layouts() -> None:
    """Take down the seed layouts kept for reuse (at the end of a pytest session)."""
    for disk in list(_KEPT):
        _KEPT.pop(disk)
        remove_volume_group(SEED_VG, disk)


@dataclass(frozen=True)
class ThinLayout:
    """A thin pool with one thin LV that holds a filesystem with a few files."""

    fstype: str
    disk: Path
    files: dict[str, str]
    vg: str = "thinvg"
    pool: str = "pool0"
    lv: str = "thinvol"
    mountpoint: Path = Path("/srv/thin")

    @property
    def device(self) -> Path:
        return Path(f"/dev/{self.vg}/{self.lv}")


def create_thin_layout(fstype: str = "ext4", disk: Path = BLANK_DISKS[1]) -> ThinLayout:
    layout = ThinLayout(fstype=fstype, disk=disk, files={})
    wait_for_disks((disk,))
    create_volume_group(layout.vg, disk)
    run("lvcreate", "--yes", "--type", "thin-pool", "-L", "1G", "-n", layout.pool, layout.vg, timeout=180)
    run("lvcreate", "--yes", "--type", "thin", "-V", "2G", "--thinpool", layout.pool, "-n", layout.lv, layout.vg)
    make_filesystem(layout.device, fstype)
    mount(layout.device, layout.mountpoint)
    (layout.mountpoint / "data").mkdir()
    write_vm_image(layout.mountpoint / "data" / "disk.img", "XBMARKER thin", size=20 * 2**20)
    (layout.mountpoint / "data" / "notes.txt").write_text("a file on a thin volume\n")
    run("sync")
    return ThinLayout(fstype=fstype, disk=disk, files=tree_hashes(layout.mountpoint))


@contextmanager
def thin_layout(fstype: str = "ext4", disk: Path = BLANK_DISKS[1]) -> Iterator[ThinLayout]:
    remove_volume_group(ThinLayout.vg)
    clear_disk(disk)
    try:
        yield create_thin_layout(fstype, disk)
    finally:
        remove_volume_group(ThinLayout.vg, disk)


@contextmanager
def mounted_snapshot(
    vg: str,
    origin: str,
    name: str,
    fstype: str,
    mountpoint: Path,
    size: str | None = "256M",
) -> Iterator[Path]:
    """A snapshot of vg/origin mounted read-only; classic with `size`, thin without.

    Thin snapshots carry the activation-skip flag, so they are activated
    with -K.
    """
    argv = ["lvcreate", "--yes", "--snapshot", "-n", name, *(["-L", size] if size else []), f"{vg}/{origin}"]
    run(*argv, timeout=180)
    try:
        if size is None:
            run("lvchange", "--activate", "y", "--ignoreactivationskip", f"{vg}/{name}")
        run("udevadm", "settle", "--timeout=30", timeout=60, check=False)
        mount(Path(f"/dev/{vg}/{name}"), mountpoint, snapshot_mount_options(fstype))
        try:
            yield mountpoint
        finally:
            umount(mountpoint)
    finally:
        try:
            run("lvremove", "--yes", f"{vg}/{name}", timeout=180)
        except CommandFailed:
            run("udevadm", "settle", "--timeout=30", timeout=60, check=False)
            run("lvremove", "--yes", "--force", f"{vg}/{name}", timeout=180)
