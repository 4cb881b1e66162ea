"""Snapshot slots and the overflow guard, with LVM faked at the process boundary."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from xenbackup import config as config_mod
from xenbackup.actions.watch import OverflowWatch, PoolFilling, SnapshotOverflowed, suggested_size
from xenbackup.lvm import Lvm
from xenbackup.model import VM, Disk, DiskMode, LvRef, SnapshotRecord, SnapshotSize
from xenbackup.state import Owner, Slots


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_slots_limit_parallel_snapshots_and_survive_crashes(tmp_path: Path) -> None:
    slots = Slots(str(tmp_path), max_parallel=1)
    me = Owner(pid=__import__("os").getpid())
    assert slots.try_acquire("vm1", me) == []
    assert slots.try_acquire("vm2", me) == ["vm1"]
    slots.release("vm1")
    assert slots.try_acquire("vm2", me) == []
    # A holder that died without releasing (SIGKILL, power cut) does not keep its slot.
    crashed = Slots(str(tmp_path), max_parallel=1)
    (tmp_path / "slots" / "vm2.slot").write_text(json.dumps({"invocation_id": "", "pid": dead_pid(), "unit": ""}))
    assert crashed.try_acquire("vm3", me) == []


def test_waiting_for_a_slot_says_for_whom(tmp_path: Path, caplog) -> None:
    slots = Slots(str(tmp_path), max_parallel=1)
    me = Owner(pid=__import__("os").getpid())
    slots.try_acquire("vm1", me)
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        slots.release("vm1")

    caplog.set_level("INFO")
    slots.acquire("vm2", me, sleep=sleep)
    assert "max_parallel=1 is held by vm1 (xenbackup@vm1.service)" in caplog.text and sleeps == [2.0]


def lv_row(name: str, attr: str, snap: str = "", data: str = "", meta: str = "", pool: str = "",
           dm: str = "") -> dict[str, str]:
    return {"lv_name": name, "vg_name": "system", "lv_attr": attr, "lv_size": str(256 << 20), "origin": "xenvm",
            "origin_size": str(1 << 30), "snap_percent": snap, "data_percent": data, "metadata_percent": meta,
            "lv_tags": "xenbackup", "pool_lv": pool, "lv_path": "", "dm": dm}


@pytest.fixture
def fake_lvm(tmp_path: Path):
    """lvs prints whatever the test puts in rows.json; lvextend records its argv."""
    rows = tmp_path / "rows.json"
    calls = tmp_path / "calls"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "lvs").write_text(f"""#!/usr/bin/env python3
import json, sys
rows = json.load(open("{rows}"))
want = sys.argv[-1].split("/")[-1]
print(json.dumps({{"report": [{{"lv": [r for r in rows if r["lv_name"] == want]}}]}}))
""")
    (bindir / "lvextend").write_text(f'#!/bin/sh\necho "lvextend $*" >> {calls}\n')
    # dmsetup prints the recorded status line of the one device asked for, as the kernel reports it.
    (bindir / "dmsetup").write_text(f'#!/bin/sh\necho "dmsetup $*" >> {calls}\ncat {tmp_path}/dm-"$2"\n')
    for p in bindir.iterdir():
        p.chmod(0o755)
    lvm = Lvm({"lvs": str(bindir / "lvs"), "lvextend": str(bindir / "lvextend"), "dmsetup": str(bindir / "dmsetup")})

    def set_rows(*r: dict[str, str]) -> None:
        rows.write_text(json.dumps(list(r)))
        for row in r:
            (tmp_path / f"dm-{row['vg_name']}-{row['lv_name']}").write_text(row.get("dm", ""))

    return lvm, set_rows, calls


VM1 = VM(name="vm1", disks=(Disk(LvRef("system", "xenvm"), DiskMode.FILES),), overflow_threshold=80)
CLASSIC = SnapshotRecord(LvRef("system", "xenvm"), "snap", "system-xenvm")
THIN = SnapshotRecord(LvRef("system", "thinvm"), "tsnap", "system-thinvm", thin=True)


def test_filling_snapshot_is_extended(fake_lvm) -> None:
    lvm, set_rows, calls = fake_lvm
    # 85 % of a 256 MiB COW (524288 sectors), as dm-snapshot counts it
    set_rows(lv_row("snap", "swi-a-s---", snap="85.00", dm="0 2097152 snapshot 445645/524288 1040\n"))
    watch = OverflowWatch(lvm, VM1, [CLASSIC], interval=3600)
    watch.poll()
    # One dmsetup status of the one device per poll, and no lvs scan of every PV.
    assert calls.read_text() == "dmsetup status system-snap\nlvextend --extents +10%ORIGIN system/snap\n"
    set_rows(lv_row("snap", "swi-a-s---", dm="0 2097152 snapshot 445645/786432 1040\n"))
    watch.check()  # extended, not overflowed: the run stays good
    assert round(watch.peak, 2) == 85.0


def test_invalid_snapshot_aborts_and_fails(fake_lvm) -> None:
    lvm, set_rows, _ = fake_lvm
    set_rows(lv_row("snap", "swi-I-s---", snap="100.00", dm="0 2097152 snapshot Invalid\n"))
    aborted: list[bool] = []
    watch = OverflowWatch(lvm, VM1, [CLASSIC], interval=3600, on_abort=lambda: aborted.append(True))
    with pytest.raises(SnapshotOverflowed, match="system/snap overflowed"):
        watch.check()
    assert aborted == [True] and watch.peak == 100.0


def test_the_first_look_runs_beside_restic_and_still_stops_it(fake_lvm, tmp_path: Path) -> None:
    """Entering the watch spawns nothing: restic starts at once. A snapshot already invalid is found by the
    thread's first look, which stops restic, and the last look fails the run."""
    lvm, set_rows, calls = fake_lvm
    set_rows(lv_row("snap", "swi-I-s---", dm="0 2097152 snapshot Invalid\n"))
    gate = tmp_path / "gate"
    dmsetup = Path(lvm.cmd["dmsetup"])
    # dmsetup waits for the test to open the gate (10 s at most, so a look taken before restic's start fails
    # the test instead of hanging it): until then the look has not been taken.
    dmsetup.write_text(f'#!/bin/sh\nfor i in $(seq 200); do [ -e {gate} ] && break; sleep 0.05; done\n'
                       + dmsetup.read_text().removeprefix("#!/bin/sh\n"))
    aborted = threading.Event()
    watch = OverflowWatch(lvm, VM1, [CLASSIC], interval=3600, on_abort=aborted.set)
    with watch:
        assert not calls.exists() and not aborted.is_set()  # entered while the first look still waits
        gate.touch()
        assert aborted.wait(30)
        with pytest.raises(SnapshotOverflowed, match="system/snap overflowed"):
            watch.check()


def test_thin_pool_nearly_full_stops_the_run(fake_lvm) -> None:
    lvm, set_rows, _ = fake_lvm
    set_rows(lv_row("tsnap", "Vwi-a-tz-k", data="20.0", pool="pool"),
             lv_row("pool", "twi-aotz--", data="96.5", meta="12.0"))
    aborted: list[bool] = []
    watch = OverflowWatch(lvm, VM1, [THIN], interval=3600, on_abort=lambda: aborted.append(True))
    with pytest.raises(PoolFilling, match="thin pool pool nearly full"):
        watch.check()
    assert aborted == [True]


def test_overflow_message_names_a_suggested_size_from_lvm(fake_lvm, caplog) -> None:
    lvm, set_rows, _ = fake_lvm
    set_rows(lv_row("snap", "swi-I-s---", dm="0 2097152 snapshot Overflow\n"))
    with pytest.raises(SnapshotOverflowed):
        OverflowWatch(lvm, VM1, [CLASSIC], interval=3600).check()
    assert 'snapshot_size = "1.0 GiB"' in caplog.text and "COW 256.0 MiB" in caplog.text


def test_suggested_size_has_headroom() -> None:
    assert suggested_size(origin_size=10 << 30, cow_size=256 << 20, peak=100.0) == SnapshotSize(1 << 30)


def test_a_guard_that_fired_before_restic_started_stops_it_at_once() -> None:
    import signal
    import subprocess

    from xenbackup.actions.backup import _Current

    current = _Current()
    current.stop()  # the pool was already nearly full at the first poll
    proc = subprocess.Popen(["sleep", "30"])
    try:
        current.set(proc)
        assert proc.wait(timeout=5) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()


def test_pool_threshold_is_the_vm_s_own(fake_lvm, write_config) -> None:
    from xenbackup import config

    cfg = config.load(str(write_config("""
        [defaults]
        pool_threshold = 80
        [vm.vm1]
        disks = [{ lv = "system/xenvm" }]
        [vm.vm2]
        pool_threshold = 98
        disks = [{ lv = "system/vm2" }]
    """)))
    lvm, set_rows, _ = fake_lvm
    set_rows(lv_row("tsnap", "Vwi-a-tz-k", data="20.0", pool="pool"),
             lv_row("pool", "twi-aotz--", data="90.0", meta="12.0"))
    with pytest.raises(PoolFilling):
        OverflowWatch(lvm, cfg.vm("vm1"), [THIN], interval=3600).check()
    OverflowWatch(lvm, cfg.vm("vm2"), [THIN], interval=3600).check()  # 90 % is below vm2's 98 %


def _sweep_host(tmp_path: Path, write_config, rows: list[dict[str, str]], settings: str = "",
                vms: str = "vm1") -> config_mod.Config:
    """A host whose lvs lists rows (filtered by the tag asked for), with lvremove and restic recording calls."""
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "lvs").write_text(f"""#!/usr/bin/env python3
import json, os, sys
rows = json.load(open("{tmp_path / 'rows.json'}"))
gone = open("{tmp_path / 'removed'}").read().split() if os.path.exists("{tmp_path / 'removed'}") else []
tag = sys.argv[-1][1:]
print(json.dumps({{"report": [{{"lv": [r for r in rows if tag in r["lv_tags"].split(",")
                                          and r["vg_name"] + "/" + r["lv_name"] not in gone]}}]}}))
""")
    (bindir / "lvremove").write_text(f'#!/bin/sh\necho "$2" >> {tmp_path / "removed"}\n')
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = json.dumps({"time": "2026-11-26T15:21:42.5Z", "exclusive": False, "hostname": socket.gethostname(),
                       "username": "root", "pid": dead.pid})
    (bindir / "restic").write_text(f"""#!/bin/sh
echo "$RESTIC_REPOSITORY $*" >> {tmp_path / "restic.calls"}
case "$1 $2" in
"list locks") echo 5f1c0ffee ;;
"cat lock") echo '{lock}' ;;
esac
""")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config").write_text("restic repository config")
    for tool in bindir.iterdir():
        tool.chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    (state / "vm1.json").write_text(json.dumps({"vm": "vm1", "result": "success", "last_success": 1000.0}))
    vm_tables = "".join(f"""
        [vm.{vm}]
        disks = [{{ lv = "system/xenvm", path = "{vm}" }}]""" for vm in vms.split())
    return config_mod.load(str(write_config(f"""
        [settings]
        runtime_dir = "{tmp_path / 'run'}"
        state_dir = "{state}"
        metrics_file = ""
        {settings}
        [commands]
        lvs = "{bindir / 'lvs'}"
        lvremove = "{bindir / 'lvremove'}"
        restic = "{bindir / 'restic'}"
        [repository]
        url = "{repo}"
        {vm_tables}
    """)))


def test_the_boot_sweep_removes_bases_whose_vm_left_the_config_or_when_incrementals_are_off(
        tmp_path: Path, write_config) -> None:
    from xenbackup.actions.context import Context
    from xenbackup.actions.sweep import sweep_all

    rows = [lv_row(f"{vm}-disk.xb-{vm}-20261126152142", "Vri---tz-k") for vm in ("vm1", "vm9")]
    for row, vm in zip(rows, ("vm1", "vm9"), strict=True):
        row["lv_tags"] = f"xenbackup,xenbackup-base:{vm}"
    cfg = _sweep_host(tmp_path, write_config, rows, settings="thin_incremental = true")
    assert sweep_all(Context.from_config(cfg)) == ["system/vm9-disk.xb-vm9-20261126152142"]
    off = config_mod.load(str(write_config((tmp_path / "xenbackup.toml").read_text().replace(
        "thin_incremental = true", ""))))
    assert sweep_all(Context.from_config(off)) == ["system/vm1-disk.xb-vm1-20261126152142"]
    assert sweep_all(Context.from_config(off)) == []


def test_the_boot_sweep_records_an_interrupted_run(tmp_path: Path, write_config) -> None:
    from xenbackup.actions.context import Context
    from xenbackup.actions.sweep import sweep_all

    rows = [lv_row("xenvm.xb-vm1-20261126152142", "swi-a-s---", snap="3.0")]
    rows[0]["lv_tags"] = "xenbackup,xenbackup-vm:vm1"
    cfg = _sweep_host(tmp_path, write_config, rows)
    repo, state = tmp_path / "repo", tmp_path / "state"
    assert sweep_all(Context.from_config(cfg)) == ["system/xenvm.xb-vm1-20261126152142"]
    record = json.loads((state / "vm1.json").read_text())
    assert record["result"] == "interrupted" and record["last_success"] == 1000.0
    assert record["stale_snapshots"] == ["system/xenvm.xb-vm1-20261126152142"]
    # The interrupted run's restic lock would block the admin's `restic check`.
    # It is this host's, and its restic is gone: restic unlock removes it (and another host's lock not).
    assert (tmp_path / "restic.calls").read_text().splitlines() == [
        f"{repo} list locks --no-lock", f"{repo} cat lock 5f1c0ffee --no-lock", f"{repo} unlock"]
    assert sweep_all(Context.from_config(cfg)) == []  # idempotent: nothing left, nothing recorded again
    assert len((state / "vm1.runs.jsonl").read_text().splitlines()) == 1
    assert len((tmp_path / "restic.calls").read_text().splitlines()) == 3
