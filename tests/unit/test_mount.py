from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from xenbackup.mount import (
    Mounter,
    MountError,
    ext_needs_recovery,
    mount_options,
    parse_mountinfo,
    superblock_fstype,
)

MOUNTINFO = (
    "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "97 22 253:3 / /run/xenbackup/vm1/mnt/system-xenvm ro,nodev - xfs /dev/mapper/system-snap ro,nouuid\n"
    "98 22 253:4 / /srv/with\\040space ro - ext4 /dev/mapper/x ro\n"
)


def test_xfs_snapshot_gets_nouuid_and_norecovery() -> None:
    opts = mount_options("xfs", journal_dirty=False)
    assert opts[0] == "ro" and "nouuid" in opts and "norecovery" in opts


def test_ext4_noload_only_with_dirty_journal() -> None:
    assert "noload" in mount_options("ext4", journal_dirty=True)
    assert "noload" not in mount_options("ext4", journal_dirty=False)


def test_extra_options_are_appended_once() -> None:
    assert mount_options("ext4", False, ["ro", "acl"]).count("ro") == 1
    assert mount_options("ext4", False, ["acl"])[-1] == "acl"


def test_mountinfo_parsing_unescapes() -> None:
    entries = parse_mountinfo(MOUNTINFO)
    assert entries[1].target == "/run/xenbackup/vm1/mnt/system-xenvm" and entries[1].fstype == "xfs"
    assert entries[2].target == "/srv/with space"


def _ext4_image(tmp_path: Path) -> Path:
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    return img


def test_needs_recovery_is_read_from_the_superblock_as_dumpe2fs_shows_it(tmp_path: Path) -> None:
    img = _ext4_image(tmp_path)
    mounter = Mounter({})
    assert mounter.journal_dirty(str(img), "ext4") is False
    subprocess.run(["debugfs", "-w", "-R", "feature needs_recovery", str(img)], check=True, capture_output=True)
    shown = subprocess.run(["dumpe2fs", "-h", str(img)], capture_output=True, text=True, check=False).stdout
    assert "needs_recovery" in shown
    assert mounter.journal_dirty(str(img), "ext4") is True
    assert mounter.journal_dirty(str(img), "xfs") is False


def test_a_device_without_an_ext_superblock_is_an_error() -> None:
    with pytest.raises(MountError):
        ext_needs_recovery(bytes(2048))


MKFS = {
    "ext2": ["mkfs.ext2", "-q", "-F"],
    "ext3": ["mkfs.ext3", "-q", "-F"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "ext4-nojournal": ["mkfs.ext4", "-q", "-F", "-O", "^has_journal"],
    "ext3-as-ext4": ["mkfs.ext4", "-q", "-F", "-t", "ext3"],
    "journal-device": ["mke2fs", "-q", "-F", "-O", "journal_dev"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
    "zeros": [],
}


@pytest.mark.parametrize("kind", sorted(MKFS))
def test_the_superblock_names_the_filesystem_as_blkid_does_or_leaves_it_to_blkid(tmp_path: Path, kind: str) -> None:
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(320 << 20)  # mkfs.xfs wants 300 MiB
    if MKFS[kind]:
        subprocess.run([*MKFS[kind], str(img)], check=True, capture_output=True)
    blkid = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", str(img)], capture_output=True, text=True,
                           check=False).stdout.strip()
    ours = superblock_fstype(img.read_bytes()[:2048])
    if kind in ("journal-device", "zeros"):
        assert ours is None and blkid in ("jbd", "")
    else:
        assert ours == blkid and blkid.startswith(("ext", "xfs"))


def test_a_device_with_both_signatures_is_left_to_blkid() -> None:
    head = bytearray(2048)
    head[:4] = b"XFSB"
    head[1024 + 0x38:1024 + 0x3A] = (0xEF53).to_bytes(2, "little")
    assert superblock_fstype(bytes(head)) is None


def test_the_mount_asks_blkid_only_for_what_the_superblock_does_not_tell(tmp_path: Path) -> None:
    blkid = tmp_path / "blkid"
    blkid.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\necho TYPE=btrfs\n")
    blkid.chmod(0o755)
    mounter = Mounter({"blkid": str(blkid)})
    assert mounter.fstype(str(_ext4_image(tmp_path))) == "ext4"
    assert not (tmp_path / "calls").exists()
    other = tmp_path / "other.img"
    other.write_bytes(bytes(4096))
    assert mounter.fstype(str(other)) == "btrfs"
    assert (tmp_path / "calls").read_text().split() == ["-p", "-o", "export", str(other)]
