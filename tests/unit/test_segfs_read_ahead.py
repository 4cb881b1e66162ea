"""The segment view's read-ahead: pure file work, no FUSE needed."""

from __future__ import annotations

from pathlib import Path

from xenbackup.segfs import raise_read_ahead


def test_the_read_ahead_of_the_segment_mount_is_raised_through_its_bdi(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 0:21 / /proc rw - proc proc rw\n"
                         "88 30 0:57 / /run/xenbackup/vm1/seg/system-vm1 ro,nosuid - fuse.xenbackup "
                         "xenbackup-segments ro\n")
    bdi = tmp_path / "bdi" / "0:57"
    bdi.mkdir(parents=True)
    (bdi / "read_ahead_kb").write_text("128\n")
    assert raise_read_ahead("/run/xenbackup/vm1/seg/system-vm1", 4096, str(mountinfo), str(tmp_path / "bdi"))
    assert (bdi / "read_ahead_kb").read_text() == "4096"
    # Not mounted, or no such bdi: reads are only slower, the backup goes on.
    assert not raise_read_ahead("/elsewhere", 4096, str(mountinfo), str(tmp_path / "bdi"))
    assert not raise_read_ahead("/proc", 4096, str(mountinfo), str(tmp_path / "bdi"))
