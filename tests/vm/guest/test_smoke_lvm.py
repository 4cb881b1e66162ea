"""Smoke tests: the seed layout and LVM snapshots, classic and thin."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from vmlib.cmd import output, tree_hashes
from vmlib.storage import BLANK_DISKS, VM_IMAGE_SIZE, SeedLayout, ThinLayout, mounted_snapshot, vg_free_bytes

SNAPSHOT_MOUNT = Path("/mnt/vmbackup")


def test_blank_disks_are_attached_by_serial() -> None:
    for disk in BLANK_DISKS:
        assert disk.is_block_device(), f"{disk} is missing"
        assert int(output("blockdev", "--getsize64", disk)) == 4 * 2**30


@pytest.mark.parametrize("seed_layout", ["ext4", "xfs"], indirect=True)
def test_seed_layout_matches_the_manual(seed_layout: SeedLayout) -> None:
    assert output("lvs", "--noheadings", "-o", "lv_full_name", "system") == "system/xenvm"
    assert output("findmnt", "-n", "-o", "SOURCE,FSTYPE", str(seed_layout.mountpoint)).split() == [
        "/dev/mapper/system-xenvm",
        seed_layout.fstype,
    ]
    assert set(seed_layout.files) == {"disk.img", "vmlinuz", "initrd.img", "vm1.cfg"}
    assert tree_hashes(seed_layout.vmdir) == seed_layout.files
    assert seed_layout.image.stat().st_size == VM_IMAGE_SIZE
    assert seed_layout.image.read_bytes()[:100].split(b"\n")[0].decode() == seed_layout.marker
    assert vg_free_bytes("system") >= 2 * 2**30, "the VG must keep room for snapshots"


@pytest.mark.parametrize("seed_layout", ["xfs", "ext4"], indirect=True)
def test_classic_snapshot_mounts_readonly_and_keeps_the_point_in_time(seed_layout: SeedLayout) -> None:
    with mounted_snapshot("system", "xenvm", "vmbackup", seed_layout.fstype, SNAPSHOT_MOUNT) as snapshot:
        snapshot_vmdir = snapshot / "vm1"
        # Change the origin after the snapshot was taken: the snapshot must not see it.
        with open(seed_layout.image, "r+b") as image:
            image.write(b"changed after the snapshot")
        (seed_layout.vmdir / "new-file").write_text("also after the snapshot")

        assert tree_hashes(snapshot_vmdir) == seed_layout.files
        options = output("findmnt", "-n", "-o", "OPTIONS", str(snapshot)).split(",")
        assert "ro" in options
        if seed_layout.fstype == "xfs":
            assert "nouuid" in options and "norecovery" in options
        with pytest.raises(OSError) as excinfo:
            (snapshot_vmdir / "probe").write_text("must fail")
        assert excinfo.value.errno == errno.EROFS
    assert output("lvs", "--noheadings", "-o", "lv_name", "system") == "xenvm"


def test_thin_snapshot_activates_with_k_and_matches(thin_layout: ThinLayout) -> None:
    with mounted_snapshot(thin_layout.vg, thin_layout.lv, "thinsnap", thin_layout.fstype, SNAPSHOT_MOUNT, size=None):
        attr, pool, origin = output(
            "lvs", "--noheadings", "-o", "lv_attr,pool_lv,origin", f"{thin_layout.vg}/thinsnap"
        ).split()
        assert (attr[0], attr[4]) == ("V", "a"), f"expected an active thin volume, lv_attr {attr}"
        assert (pool, origin) == (thin_layout.pool, thin_layout.lv)
        (thin_layout.mountpoint / "data" / "notes.txt").write_text("changed after the snapshot\n")

        assert tree_hashes(SNAPSHOT_MOUNT) == thin_layout.files
    assert tree_hashes(thin_layout.mountpoint) != thin_layout.files
