"""The pool's metadata snapshot is always released, and a run's snapshot becomes a base by its tags.

dmsetup and lvchange are recording scripts here: the build machine has no device-mapper (the VM test bed
runs the real ones)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from xenbackup.model import LvRef
from xenbackup.thin import DeltaError
from xenbackup.thinpool import ThinPools, dm_name, parse_thin_lvs

LVS = """{"report": [{"lv": [
  {"lv_name":"disk", "vg_name":"vg-a", "lv_attr":"Vwi-aotz--", "lv_size":"1073741824", "origin":"",
   "pool_lv":"pool", "thin_id":"1", "lv_tags":""},
  {"lv_name":"disk.xb-vm1-1", "vg_name":"vg-a", "lv_attr":"Vri-a-tz-k", "lv_size":"1073741824", "origin":"disk",
   "pool_lv":"pool", "thin_id":"7", "lv_tags":"xenbackup,xenbackup-base:vm1"},
  {"lv_name":"pool", "vg_name":"vg-a", "lv_attr":"twi-aotz--", "lv_size":"2147483648", "origin":"",
   "pool_lv":"", "thin_id":"", "lv_tags":""}]}]}"""


def test_thin_ids_pools_and_tags_from_lvs() -> None:
    disk, base, pool = parse_thin_lvs(LVS)
    assert (disk.thin_id, disk.pool_ref, base.origin, base.thin_id) == (1, LvRef("vg-a", "pool"), "disk", 7)
    assert "xenbackup-base:vm1" in base.tags
    assert pool.thin_id is None


def test_device_mapper_names_double_dashes() -> None:
    assert dm_name(LvRef("vg-a", "thin-pool")) == "vg--a-thin--pool"


def _recorder(tmp_path: Path, fail: str = "") -> tuple[ThinPools, Path]:
    log = tmp_path / "calls"
    script = tmp_path / "dmsetup"
    script.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\n"
                      + (f'case "$*" in *{fail}*) echo "message ioctl failed: Invalid argument" >&2; exit 1;; esac\n'
                         if fail else ""))
    script.chmod(0o755)
    return ThinPools({"dmsetup": str(script), "thin_delta": "/bin/false"}, str(tmp_path / "state")), log


def test_metadata_snapshot_is_recorded_while_held_and_released_after(tmp_path: Path) -> None:
    tp, log = _recorder(tmp_path)
    record = tmp_path / "state" / "metadata-snapshots" / "vg-a+pool"
    with tp.metadata_snapshot(LvRef("vg-a", "pool")) as meta:
        assert meta == "/dev/mapper/vg--a-pool_tmeta"
        assert record.read_text() == "vg-a/pool\n"
        assert tp.release_leftovers() == []  # held by a live run: left alone
    assert log.read_text().splitlines() == ["message vg--a-pool-tpool 0 reserve_metadata_snap",
                                            "message vg--a-pool-tpool 0 release_metadata_snap"]
    assert not record.exists()


def test_metadata_snapshot_released_after_an_error_inside(tmp_path: Path) -> None:
    tp, log = _recorder(tmp_path)
    with pytest.raises(RuntimeError), tp.metadata_snapshot(LvRef("vg", "pool")):
        raise RuntimeError("thin_delta died")
    assert log.read_text().splitlines()[-1] == "message vg-pool-tpool 0 release_metadata_snap"


def test_a_killed_runs_record_is_released_by_the_next_cleanup(tmp_path: Path) -> None:
    tp, log = _recorder(tmp_path)
    records = tmp_path / "state" / "metadata-snapshots"
    records.mkdir(parents=True)
    (records / "vg+pool").write_text("vg/pool\n")  # what a SIGKILL after the reservation leaves
    assert tp.release_leftovers() == ["vg/pool"]
    assert log.read_text().splitlines() == ["message vg-pool-tpool 0 release_metadata_snap"]
    assert not (records / "vg+pool").exists()


def test_a_record_left_before_the_reservation_is_dropped(tmp_path: Path) -> None:
    tp, _ = _recorder(tmp_path, fail="release")
    records = tmp_path / "state" / "metadata-snapshots"
    records.mkdir(parents=True)
    (records / "vg+pool").write_text("vg/pool\n")
    assert tp.release_leftovers() == []
    assert not (records / "vg+pool").exists()


def test_a_pool_held_by_another_run_means_full_read(tmp_path: Path) -> None:
    tp, log = _recorder(tmp_path)
    records = tmp_path / "state" / "metadata-snapshots"
    records.mkdir(parents=True)
    fd = os.open(records / "vg+pool", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(DeltaError, match="another run"), tp.metadata_snapshot(LvRef("vg", "pool")):
            pass
    finally:
        os.close(fd)
    assert not log.exists()


def test_reservation_refused_is_a_delta_error_and_leaves_no_record(tmp_path: Path) -> None:
    tp, _ = _recorder(tmp_path, fail="reserve")
    with pytest.raises(DeltaError, match="release_metadata_snap"), tp.metadata_snapshot(LvRef("vg", "pool")):
        pass
    assert os.listdir(tmp_path / "state" / "metadata-snapshots") == []
