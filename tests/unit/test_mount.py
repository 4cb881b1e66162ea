from __future__ import annotations

from xenbackup.mount import mount_options, parse_mountinfo

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
