"""Disk discovery: the hypervisors' own domain definitions, mapped to LVs by device number."""

from __future__ import annotations

from pathlib import Path

import pytest

from xenbackup.discovery import DiscoveryError, PathFacts, parse_losetup, parse_mountinfo, resolve
from xenbackup.hypervisor import HypervisorError, parse_virsh_xml, parse_xl_config, parse_xl_state
from xenbackup.lvm import LogicalVolume
from xenbackup.model import VM, DiskMode, DomainDisk, HypervisorKind, LvRef

DATA = Path(__file__).parent / "data"


def lv(vg: str, name: str, major: int, minor: int) -> LogicalVolume:
    return LogicalVolume(vg=vg, name=name, attr="-wi-ao----", size=1 << 30, origin="", origin_size=0,
                         snap_percent=None, data_percent=None, metadata_percent=None, tags=(), pool="",
                         kernel_major=major, kernel_minor=minor)


class FakeProbe:
    """What the kernel would say about each path (the test's stand-in for stat, losetup and mountinfo)."""

    def __init__(self, facts: dict[str, PathFacts], loops: dict[tuple[int, int], str] | None = None,
                 mounts: dict[tuple[int, int], str] | None = None) -> None:
        self._facts = facts
        self._loops = loops or {}
        self._mounts = mounts or {}

    def facts(self, path: str) -> PathFacts | None:
        return self._facts.get(path)

    def loop_backing_file(self, device: tuple[int, int]) -> str | None:
        return self._loops.get(device)

    def mountpoint(self, device: tuple[int, int]) -> str | None:
        return self._mounts.get(device)


LVS = [lv("system", "db1-root", 254, 3), lv("system", "db1-data", 254, 4), lv("system", "xenvm", 254, 1),
       lv("system", "web-swap", 254, 9), lv("system", "other", 254, 7)]


def blk(major: int, minor: int, real: str = "") -> PathFacts:
    return PathFacts(block=(major, minor), realpath=real)


def reg(major: int, minor: int, real: str) -> PathFacts:
    return PathFacts(filesystem=(major, minor), realpath=real)


def vm(**kw: object) -> VM:
    return VM(name=str(kw.pop("name", "db1")), disks=(), **kw)  # type: ignore[arg-type]


# --- parsing the hypervisors' output ----------------------------------------------------------

def test_xl_dry_run_json_gives_every_disk_with_cdroms_marked() -> None:
    disks = parse_xl_config((DATA / "xl-N-create-db1.json").read_text())
    assert disks == [
        DomainDisk("xvda", "/dev/system/db1-root"),
        DomainDisk("xvdb", "/dev/mapper/system-db1--data"),
        DomainDisk("xvdc", "/dev/dm-7"),
        DomainDisk("hdc", "/srv/iso/debian.iso", cdrom=True),
        DomainDisk("hdd", "", cdrom=True),
    ]


def test_xl_list_long_json_of_a_running_domain() -> None:
    disks = parse_xl_config((DATA / "xl-list-l-web.json").read_text())
    assert [(d.target, d.source) for d in disks] == [
        ("xvda", "/srv/xenvm/web/disk.img"), ("xvdb", "/srv/xenvm/web/data.img"), ("xvdc", "/dev/loop3"),
        ("xvdd", "/dev/system/web-swap")]


@pytest.mark.parametrize("text", ["", "not json", "[]", '[{"config": {"disks": 3}}]', '{"disks": [1]}'])
def test_unreadable_xl_output_is_one_clear_error(text: str) -> None:
    with pytest.raises(HypervisorError, match="domain config xenbackup cannot read"):
        parse_xl_config(text, "xl -N create")


def test_virsh_dumpxml_disks_cdrom_network_and_file() -> None:
    disks = parse_virsh_xml((DATA / "virsh-dumpxml-kvm1.xml").read_text())
    assert disks == [
        DomainDisk("vda", "/dev/vmvg/kvm1-root"),
        DomainDisk("vdb", "/dev/disk/by-id/dm-name-vmvg-kvm1--data"),
        DomainDisk("vdc", "/var/lib/libvirt/images/kvm1-scratch.qcow2"),
        DomainDisk("sda", "", cdrom=True),
        DomainDisk("vdd", "rbd/kvm1-extra", network="rbd"),
        DomainDisk("vde", "/dev/sdb1"),
    ]


def test_broken_virsh_xml_is_an_error() -> None:
    with pytest.raises(HypervisorError, match="virsh dumpxml"):
        parse_virsh_xml("<domain><devices>")


def test_xl_list_state_column() -> None:
    out = ("Name                                        ID   Mem VCPUs\tState\tTime(s)\n"
           "db1   3   256     1     --p---       1.2\n")
    assert parse_xl_state(out, "db1") == "--p---"
    with pytest.raises(HypervisorError):
        parse_xl_state(out, "db2")


def test_losetup_json_and_mountinfo() -> None:
    loops = parse_losetup('{"loopdevices": [{"name": "/dev/loop3", "maj:min": "7:3", '
                          '"back-file": "/srv/xenvm/web/swap.img (deleted)"}, {"name": "/dev/loop0", '
                          '"maj:min": "7:0", "back-file": null}]}')
    assert loops == {(7, 3): "/srv/xenvm/web/swap.img"}
    info = ("22 1 254:1 / /srv/xenvm rw,relatime shared:1 - ext4 /dev/mapper/system-xenvm rw\n"
            "23 1 254:1 /sub /mnt/bind rw - ext4 /dev/mapper/system-xenvm rw\n"
            "24 1 254:5 / /srv/with\\040space rw - xfs /dev/mapper/x rw\n")
    assert parse_mountinfo(info) == {(254, 1): "/srv/xenvm", (254, 5): "/srv/with space"}


# --- mapping to LVs ---------------------------------------------------------------------------

def test_block_disks_map_by_device_number_whatever_the_path_spelling() -> None:
    probe = FakeProbe({"/dev/system/db1-root": blk(254, 3), "/dev/mapper/system-db1--data": blk(254, 4),
                       "/dev/dm-7": blk(254, 7)})
    disks = resolve(vm(), parse_xl_config((DATA / "xl-N-create-db1.json").read_text()), LVS, probe)
    assert [(str(d.lv), d.mode) for d in disks] == [
        ("system/db1-root", DiskMode.BLOCK), ("system/db1-data", DiskMode.BLOCK), ("system/other", DiskMode.BLOCK)]
    assert disks[1].source == "xvdb: /dev/mapper/system-db1--data"


def test_images_on_one_lv_are_one_files_mode_snapshot_of_their_directory() -> None:
    probe = FakeProbe(
        {"/srv/xenvm/web/disk.img": reg(254, 1, "/srv/xenvm/web/disk.img"),
         "/srv/xenvm/web/data.img": reg(254, 1, "/srv/xenvm/web/data.img"),
         "/dev/loop3": blk(7, 3), "/srv/xenvm/web/swap.img": reg(254, 1, "/srv/xenvm/web/swap.img"),
         "/dev/system/web-swap": blk(254, 9)},
        loops={(7, 3): "/srv/xenvm/web/swap.img"}, mounts={(254, 1): "/srv/xenvm"})
    disks = resolve(vm(name="web", exclude=("xvdd",)),
                    parse_xl_config((DATA / "xl-list-l-web.json").read_text()), LVS, probe)
    assert len(disks) == 1
    (disk,) = disks
    assert (disk.lv, disk.mode, disk.path) == (LvRef("system", "xenvm"), DiskMode.FILES, "web")
    assert disk.source == ("xvda: /srv/xenvm/web/disk.img, xvdb: /srv/xenvm/web/data.img, "
                           "xvdc: /srv/xenvm/web/swap.img")


def test_excluded_swap_is_dropped_and_without_exclude_it_is_backed_up() -> None:
    probe = FakeProbe({"/dev/system/web-swap": blk(254, 9), "/dev/system/db1-root": blk(254, 3)})
    domain = [DomainDisk("xvda", "/dev/system/db1-root"), DomainDisk("xvdb", "/dev/system/web-swap")]
    assert [str(d.lv) for d in resolve(vm(exclude=("xvdb",)), domain, LVS, probe)] == ["system/db1-root"]
    assert len(resolve(vm(), domain, LVS, probe)) == 2


def test_images_in_different_directories_of_one_lv_share_their_common_parent() -> None:
    probe = FakeProbe({"/srv/xenvm/a/1.img": reg(254, 1, "/srv/xenvm/a/1.img"),
                       "/srv/xenvm/b/2.img": reg(254, 1, "/srv/xenvm/b/2.img")}, mounts={(254, 1): "/srv/xenvm"})
    disks = resolve(vm(), [DomainDisk("xvda", "/srv/xenvm/a/1.img"), DomainDisk("xvdb", "/srv/xenvm/b/2.img")],
                    LVS, probe)
    assert [(d.mode, d.path) for d in disks] == [(DiskMode.FILES, ".")]


def test_every_disk_not_on_lvm_is_named_at_once() -> None:
    probe = FakeProbe({"/dev/sdb1": blk(8, 17), "/var/lib/libvirt/images/kvm1-scratch.qcow2":
                       reg(8, 2, "/var/lib/libvirt/images/kvm1-scratch.qcow2"),
                       "/dev/vmvg/kvm1-root": blk(254, 3), "/dev/disk/by-id/dm-name-vmvg-kvm1--data": blk(254, 4)})
    domain = parse_virsh_xml((DATA / "virsh-dumpxml-kvm1.xml").read_text())
    with pytest.raises(DiscoveryError) as err:
        resolve(vm(name="kvm1", hypervisor=HypervisorKind.KVM), domain, LVS, probe)
    problems = err.value.problems
    assert len(problems) == 3
    assert "vdc" in problems[0] and "not on an LVM logical volume" in problems[0]
    assert "vdd is served over rbd" in problems[1]
    assert "vde (/dev/sdb1) is not an LVM logical volume" in problems[2]
    assert all('to exclude' in p for p in problems)


def test_excluding_the_non_lvm_disks_leaves_the_lvs() -> None:
    probe = FakeProbe({"/dev/vmvg/kvm1-root": blk(254, 3), "/dev/disk/by-id/dm-name-vmvg-kvm1--data": blk(254, 4)})
    domain = parse_virsh_xml((DATA / "virsh-dumpxml-kvm1.xml").read_text())
    disks = resolve(vm(name="kvm1", exclude=("vdc", "vdd", "vde")), domain, LVS, probe)
    assert [str(d.lv) for d in disks] == ["system/db1-root", "system/db1-data"]


def test_missing_path_loop_without_file_and_no_disks_left() -> None:
    probe = FakeProbe({"/dev/loop9": blk(7, 9)})
    with pytest.raises(DiscoveryError) as err:
        resolve(vm(), [DomainDisk("xvda", "/dev/system/gone"), DomainDisk("xvdb", "/dev/loop9")], LVS, probe)
    assert err.value.problems == ["disk xvda: /dev/system/gone does not exist",
                                  "disk xvdb: loop device /dev/loop9 has no backing file"]
    with pytest.raises(DiscoveryError, match="names no disk"):
        resolve(vm(), [DomainDisk("hdc", "/x.iso", cdrom=True)], LVS, probe)


def test_the_same_lv_named_twice_is_one_snapshot() -> None:
    probe = FakeProbe({"/dev/system/db1-root": blk(254, 3), "/dev/dm-3": blk(254, 3)})
    disks = resolve(vm(), [DomainDisk("xvda", "/dev/system/db1-root"), DomainDisk("xvdb", "/dev/dm-3")], LVS, probe)
    assert len(disks) == 1
