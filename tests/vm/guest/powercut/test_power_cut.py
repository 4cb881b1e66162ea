"""Fault 10 of the matrix: the machine loses power mid-backup and boots again.

The first boot makes the seed layout, takes a good backup, starts a second
one and resets the machine while restic is writing (sysrq b: no sync, no
unmount, no ExecStopPost). The test bed boots the guest again on the same
disks and this test runs again: now the boot-time xenbackup-cleanup.service
must have removed the tagged snapshot it left (and nothing a human made),
the origin's files must be unchanged, the repository must pass its checks
with the earlier backup intact, and the next run must succeed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vmlib.power import boot_id, cut_power, forget_notes, load_notes
from vmlib.product import (
    MSG_STALE,
    SLOW_UPLOAD,
    Journal,
    Xb,
    ballast,
    fresh_product,
    our_mounts,
    our_snapshots,
    sh,
    tree_hashes,
)
from vmlib.storage import (
    BLANK_DISKS,
    SEED_MOUNTPOINT,
    SEED_VG,
    clear_disk,
    create_seed_layout,
    mount,
    remove_volume_group,
)

CONFIG = """
[vm.vm1]
snapshot_size = "512M"
disks = [{ lv = "system/xenvm", mode = "files", path = "vm1" }]
"""
HUMAN_SNAPSHOT = "admin-snap"


def test_power_cut_mid_backup_is_cleaned_up_at_boot(tmp_path: Path) -> None:
    notes = load_notes()
    if notes is None:
        _before_the_power_cut()
    try:
        _after_the_power_cut(notes, tmp_path)
    finally:
        forget_notes()
        sh("lvremove", "--yes", f"{SEED_VG}/{HUMAN_SNAPSHOT}", check=False)
        remove_volume_group(SEED_VG, BLANK_DISKS[0])
        for _ in fresh_product():
            pass


def _before_the_power_cut() -> None:
    next(fresh_product())
    remove_volume_group(SEED_VG)
    clear_disk(BLANK_DISKS[0])
    layout = create_seed_layout("ext4", BLANK_DISKS[0])
    xb = Xb()
    xb.write_config(CONFIG)
    journal = Journal()
    assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")
    earlier = sorted(str(s["id"]) for s in xb.snapshots("mode:files"))

    # restic uploads the ballast slowly: the power goes while it writes packs, without hundreds of MiB to make.
    ballast(layout.vmdir)
    xb.write_config(SLOW_UPLOAD + CONFIG)
    sh("sync")
    sh("lvcreate", "--yes", "-s", "-L", "32M", "-n", HUMAN_SNAPSHOT, f"{SEED_VG}/xenvm")
    files = tree_hashes(layout.vmdir)
    sh("systemctl", "start", "--no-block", "xenbackup@vm1.service")
    xb.wait_for_restic(journal)
    time.sleep(2)  # restic has taken its lock and is writing packs
    ours = our_snapshots()
    assert len(ours) == 1, f"expected one snapshot of ours mid-backup, found {ours}"
    assert sh("systemctl", "is-active", "xenbackup@vm1.service", check=False).stdout.strip() == "activating"
    cut_power({"files": files, "earlier": earlier, "snapshot": ours[0], "mounts": our_mounts()})


def _after_the_power_cut(notes: dict[str, Any], tmp_path: Path) -> None:
    assert notes["boot_id"] != boot_id(), "the machine did not reboot"
    assert notes["mounts"], "the first boot had the snapshot mounted when the power went"

    # The boot-time sweep ran before this test (the test bed starts after multi-user.target).
    unit = "xenbackup-cleanup.service"
    shown = sh("systemctl", "show", unit, "-p", "Result", "-p", "ExecMainExitTimestampMonotonic").stdout
    props = dict(line.split("=", 1) for line in shown.splitlines())
    swept_at = int(props["ExecMainExitTimestampMonotonic"])
    assert swept_at != 0, f"{unit} did not run at boot"
    target = sh("systemctl", "show", "multi-user.target", "-p", "ActiveEnterTimestampMonotonic", "--value").stdout
    assert swept_at <= int(target), "boot reached multi-user.target before the stale snapshots were removed"
    assert props["Result"] == "success", sh("journalctl", "-b", "-u", unit, "--no-pager").stdout
    boot_journal = sh("journalctl", "-b", "-u", unit, "-o", "cat", f"MESSAGE_ID={MSG_STALE}", "--no-pager").stdout
    stale = [line for line in boot_journal.splitlines() if notes["snapshot"] in line]
    assert len(stale) == 1, f"the sweep did not name {notes['snapshot']} in one line:\n{boot_journal}"

    assert our_snapshots() == [], "a snapshot of ours survived the boot"
    assert our_mounts() == [], "a mount of ours survived the boot"
    lvs = sh("lvs", "--noheadings", "-o", "lv_name", SEED_VG).stdout.split()
    assert HUMAN_SNAPSHOT in lvs, "the boot-time sweep removed a snapshot a human made"

    # `xenbackup status` (and its exit code, for monitoring) shows the run the power cut ended.
    status = sh("xenbackup", "status", "--json", check=False)
    (row,) = json.loads(status.stdout)
    assert status.returncode != 0 and row["result"] == "interrupted", status.stdout
    assert row["last_success"] is not None

    mount(Path(f"/dev/{SEED_VG}/xenvm"), SEED_MOUNTPOINT)
    vmdir = SEED_MOUNTPOINT / "vm1"
    assert tree_hashes(vmdir) == notes["files"], "the origin's files changed"

    xb = Xb()
    journal = Journal()
    verify = sh("xenbackup", "verify", check=False, timeout=900)
    assert verify.returncode == 0, verify.stdout + verify.stderr + journal.text("-t", "xenbackup")
    xb.restic("check")
    assert sorted(str(s["id"]) for s in xb.snapshots("mode:files")) == notes["earlier"], (
        "the interrupted run must leave no backup, and the earlier one must stay"
    )

    xb.write_config(CONFIG)
    run = xb.start()
    assert run.returncode == 0, journal.text("-u", "xenbackup@vm1")
    assert our_snapshots() == [] and our_mounts() == []
    xb.restic("restore", "latest", "--target", str(tmp_path / "r"), "--tag", "mode:files")
    assert tree_hashes(tmp_path / "r" / "vm1") == notes["files"], "the next backup does not hold the origin's files"
