"""xenbackup@.service on real systemd, LVM and restic, in the seed manual's layout."""

from __future__ import annotations

import json
import marshal
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from vmlib.product import (
    CONFIG,
    MSG_FAILED,
    MSG_STARTED,
    MSG_SUCCEEDED,
    SLOW_UPLOAD,
    STATE_DIR,
    Journal,
    Xb,
    ballast,
    our_mounts,
    our_snapshots,
    sh,
    tree_hashes,
)

SEED_CONFIG = """
[vm.vm1]
snapshot_size = "256M"
disks = [{ lv = "system/xenvm", mode = "files", path = "vm1" }]
"""


def assert_head_start_taken(ours: list[dict[str, object]], journal: Journal, key_check_left: bool = True) -> None:
    """The prepare step left the backup step its restic command; the backup step started it before it loaded
    its code, and then ran that very process. The backup step left the next run its key check, unless the next
    run's prepare step stores the domain config in its place."""
    ahead = [e for e in ours if e.get("XENBACKUP_PHASE") == "backup"
             and "s ahead, before this step loaded its code" in str(e.get("MESSAGE", ""))]
    assert len(ahead) == 1 and str(ahead[0]["MESSAGE"]).startswith("restic was started "), journal.text(
        "-u", "xenbackup@vm1")
    assert "started ahead" not in journal.text("-u", "xenbackup@vm1")
    # What is left is the next run's key check, not this invocation's backup command. Other VMs' earlier
    # tests may have left their own key checks beside it.
    left = sorted(p.name for p in Path("/run/xenbackup/.headstart").iterdir())
    assert ("vm1.prepare" in left) == key_check_left and all(name.endswith(".prepare") for name in left), left


def restore_tree(xb: Xb, target: Path, snapshot: str = "latest") -> Path:
    # Files mode stores the tree relative to the filesystem's root, so vm1/ comes back as vm1/.
    xb.restic("restore", snapshot, "--target", str(target), "--tag", "disk:system/xenvm")
    return target / "vm1"


@pytest.mark.parametrize("seed_layout", ["ext4", "xfs"], indirect=True)
def test_unit_backup_stores_origin_bytes_and_leaves_nothing(seed_layout, xb: Xb, journal: Journal,
                                                            tmp_path: Path) -> None:
    Path("/etc/xen").mkdir(exist_ok=True)
    Path("/etc/xen/vm1.cfg").write_text('name = "vm1"\nmemory = 256\n')
    xb.write_config(SEED_CONFIG)
    before = tree_hashes(seed_layout.vmdir)

    run = xb.start()

    assert run.returncode == 0, journal.text("-u", "xenbackup@vm1")
    assert tree_hashes(restore_tree(xb, tmp_path / "r")) == before
    assert tree_hashes(seed_layout.vmdir) == before, "the origin changed"
    # The domain config rides in the files-mode disk's own restic run: no second repository open.
    assert xb.snapshots("vm:vm1", "mode:config") == []
    (carrier,) = xb.snapshots("vm:vm1", "config:inside")
    assert xb.restic("dump", str(carrier["id"]), "/etc/xen/vm1.cfg").stdout == 'name = "vm1"\nmemory = 256\n'
    assert our_snapshots() == [] and our_mounts() == []
    entries = journal.entries("-u", "xenbackup@vm1.service")
    ours = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "xenbackup" and e.get("XENBACKUP_VM") == "vm1"]
    assert {e.get("XENBACKUP_PHASE") for e in ours} >= {"snapshot", "mount", "backup", "cleanup"}
    ids = [e.get("MESSAGE_ID") for e in ours]
    assert MSG_STARTED in ids and MSG_SUCCEEDED in ids and MSG_FAILED not in ids
    # The backup step finished the good run; the unit's ExecStopPost= shell found its invocation's marker
    # and started no interpreter.
    assert [e.get("XENBACKUP_PHASE") for e in ours if e.get("MESSAGE_ID") == MSG_SUCCEEDED] == ["cleanup"]
    (confirmed,) = [e for e in entries if str(e.get("MESSAGE", "")).endswith(
        "the backup step of vm1 finished the run; nothing left to release")]
    # journald reads _EXE from /proc when the line arrives; the shell may be gone by then, so it can be absent.
    assert confirmed.get("_EXE") in (None, os.path.realpath("/bin/sh")), confirmed.get("_EXE")
    assert list(Path("/run/xenbackup/.finished").iterdir()) == []
    assert_head_start_taken(ours, journal)
    # A later step kept what tomllib made of the config for the next one: the run outlasted the 2 s a
    # freshly written file waits before it is cached. Root's only: the file may hold a repository URL's password.
    cache = Path("/run/xenbackup/.config-cache")
    assert cache.stat().st_mode & 0o777 == 0o600 and cache.stat().st_uid == 0
    key, raw = marshal.loads(cache.read_bytes())
    assert key[1] == str(CONFIG) and key[3] == CONFIG.stat().st_ino and "vm1" in raw["vm"]
    assert json.loads((STATE_DIR / "vm1.json").read_text())["result"] == "success"
    # The catalog explains the operator-facing events (journalctl -x).
    assert "Backup of VM vm1 succeeded" in journal.text("-x", "-u", "xenbackup@vm1")
    listing = sh("xenbackup", "list", "vm1").stdout
    assert "vm1" in listing and "files+config" in listing


def test_backup_is_point_in_time_while_a_writer_appends(seed_layout, xb: Xb, journal: Journal,
                                                        tmp_path: Path) -> None:
    xb.write_config(SEED_CONFIG)
    log = seed_layout.vmdir / "append.log"
    stop = threading.Event()
    static = tree_hashes(seed_layout.vmdir)

    def writer() -> None:
        n = 0
        with open(log, "a") as f:
            while not stop.is_set():
                f.write(f"record {n:08d} " + "x" * 100 + "\n")
                f.flush()
                os.fsync(f.fileno())
                n += 1
                time.sleep(0.005)

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(1)
        run = xb.start()
    finally:
        stop.set()
        t.join()
    assert run.returncode == 0, journal.text("-u", "xenbackup@vm1")
    restored = restore_tree(xb, tmp_path / "r")
    copy = (restored / "append.log").read_bytes()
    origin = log.read_bytes()
    # A point-in-time copy: whole records, and a prefix of what the origin holds now.
    assert copy and copy.endswith(b"\n") and origin.startswith(copy)
    assert len(copy) < len(origin), "the writer kept writing after the snapshot"
    numbers = [int(line.split()[1]) for line in copy.decode().splitlines()]
    assert numbers == list(range(len(numbers)))
    after = tree_hashes(seed_layout.vmdir)
    assert {k: v for k, v in after.items() if k != "append.log"} == static
    assert our_snapshots() == []


def test_mount_failure_skips_backup_and_removes_snapshot(seed_layout, xb: Xb, journal: Journal) -> None:
    xb.write_config(SEED_CONFIG.replace('snapshot_size = "256M"',
                                        'snapshot_size = "256M"\nmount_options = ["no_such_option_xb"]'))
    run = xb.start()
    assert run.returncode != 0
    text = journal.text("-u", "xenbackup@vm1")
    assert "cannot mount" in text
    phases = {e.get("XENBACKUP_PHASE") for e in journal.entries("-u", "xenbackup@vm1.service")}
    assert "backup" not in phases, "ExecStart= ran after a failed mount"
    assert "cleanup" in phases
    assert our_snapshots() == [] and our_mounts() == []
    assert xb.snapshots() == [], "a run whose mount failed stored a restic snapshot"

    xb.write_config(SEED_CONFIG)
    assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")
    assert our_snapshots() == []


def test_unwritable_repository_fails_the_unit_and_cleans_up(seed_layout, xb: Xb, journal: Journal) -> None:
    ro = Path("/mnt/xb-readonly")
    ro.mkdir(exist_ok=True)
    sh("mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro))
    try:
        xb.write_config(f'[repository]\nurl = "{ro}/repo"\n' + SEED_CONFIG)
        run = xb.start()
        assert run.returncode != 0
        text = journal.text("-u", "xenbackup@vm1")
        assert "read-only file system" in text.lower()
        failed = [e for e in journal.entries("-u", "xenbackup@vm1.service") if e.get("MESSAGE_ID") == MSG_FAILED]
        assert failed and failed[-1].get("XENBACKUP_PHASE") == "cleanup"
        assert our_snapshots() == [] and our_mounts() == []
    finally:
        sh("umount", str(ro))
    xb.write_config(SEED_CONFIG)
    assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")


def test_sigkill_during_backup_still_runs_cleanup(seed_layout, xb: Xb, journal: Journal) -> None:
    # restic is still uploading when the unit is killed.
    big = ballast(seed_layout.vmdir)
    xb.write_config(SLOW_UPLOAD + SEED_CONFIG)
    sh("systemctl", "start", "--no-block", "xenbackup@vm1.service")
    xb.wait_for_restic(journal)
    # While restic runs, `systemctl status` shows its progress (sd_notify STATUS=).
    deadline = time.monotonic() + 60
    status = ""
    while "%" not in status and time.monotonic() < deadline:
        status = sh("systemctl", "show", "-p", "StatusText", "--value", "xenbackup@vm1.service").stdout
        time.sleep(0.5)
    assert "% " in status or "%," in status, status
    assert "vm1 system/xenvm" in status and "/s" in status
    # The overflow guard watches the snapshot, so dmeventd is not asked to (dmeventd_monitoring = false).
    monitored = sh("lvs", "--noheadings", "-o", "seg_monitor", "@xenbackup").stdout.split("\n")
    assert [m.strip() for m in monitored if m.strip()] == ["not monitored"], monitored
    sh("systemctl", "kill", "-s", "KILL", "xenbackup@vm1.service")
    assert xb.wait_inactive() == "failed"
    assert our_snapshots() == [] and our_mounts() == []
    phases = [e.get("XENBACKUP_PHASE") for e in journal.entries("-u", "xenbackup@vm1.service")]
    assert "cleanup" in phases
    assert "result=signal" in journal.text("-u", "xenbackup@vm1")
    big.unlink()
    xb.write_config(SEED_CONFIG)
    sh("systemctl", "reset-failed", "xenbackup@vm1.service")
    assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")


def test_timer_starts_the_backup_when_its_calendar_elapses(seed_layout, xb: Xb, journal: Journal) -> None:
    xb.write_config(SEED_CONFIG)
    when = time.strftime("%H:%M:%S", time.localtime(time.time() + 20))
    dropin = Path("/run/systemd/system/xenbackup@vm1.timer.d")
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "soon.conf").write_text(f"[Timer]\nOnCalendar=\nOnCalendar=*-*-* {when}\n"
                                      "RandomizedDelaySec=0\nAccuracySec=1s\nPersistent=false\n")
    sh("systemctl", "daemon-reload")
    sh("systemctl", "start", "xenbackup@vm1.timer")
    deadline = time.monotonic() + 240
    while not [e for e in journal.entries("-u", "xenbackup@vm1.service") if e.get("MESSAGE_ID") == MSG_SUCCEEDED]:
        assert time.monotonic() < deadline, journal.text("-u", "xenbackup@vm1.service")
        time.sleep(2)
    assert len(xb.snapshots("vm:vm1", "mode:files")) == 1


def test_units_verify_cleanly() -> None:
    out = sh("systemd-analyze", "verify", "xenbackup@vm1.service", "xenbackup@vm1.timer",
             "xenbackup-cleanup.service", check=False)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


@pytest.mark.parametrize("seed_layout", ["ext4"], indirect=True)
def test_vm_names_that_need_escaping_work(seed_layout, xb: Xb, journal: Journal) -> None:
    xb.write_config(SEED_CONFIG.replace("[vm.vm1]", '[vm."web-01.example"]'))
    escaped = sh("systemd-escape", "web-01.example").stdout.strip()
    for instance in ("web-01.example", escaped):
        run = subprocess.run(["systemctl", "start", f"xenbackup@{instance}.service"], capture_output=True,
                             text=True, check=False, timeout=600)
        assert run.returncode == 0, journal.text("-u", f"xenbackup@{instance}.service")
    assert len(xb.snapshots("vm:web-01.example", "mode:files")) == 2
    assert our_snapshots() == []


def test_thin_origin_gets_a_thin_snapshot(thin_layout, xb: Xb, journal: Journal, tmp_path: Path) -> None:
    xb.write_config(f"""
        [vm.vm1]
        disks = [{{ lv = "{thin_layout.vg}/{thin_layout.lv}", mode = "files", path = "." }}]
    """)
    before = tree_hashes(thin_layout.mountpoint)
    run = xb.start()
    assert run.returncode == 0, journal.text("-u", "xenbackup@vm1")
    assert "thin snapshot" in journal.text("-u", "xenbackup@vm1")
    xb.restic("restore", "latest", "--target", str(tmp_path / "r"), "--tag", "mode:files")
    restored = tree_hashes(tmp_path / "r")
    assert {k: v for k, v in restored.items() if not k.startswith("lost+found")} == before
    assert our_snapshots() == []


@pytest.mark.parametrize("seed_layout", ["ext4"], indirect=True)
def test_block_mode_stores_the_device_bytes(seed_layout, xb: Xb, journal: Journal, tmp_path: Path) -> None:
    sh("lvcreate", "--yes", "-L", "16M", "-n", "vm1disk", "system")
    try:
        sh("dd", "if=/dev/urandom", "of=/dev/system/vm1disk", "bs=1M", "count=16", "oflag=direct", "status=none")
        want = sh("sha256sum", "/dev/system/vm1disk").stdout.split()[0]
        xb.write_config("""
            [vm.vm1]
            snapshot_size = "16M"
            disks = [{ lv = "system/vm1disk", mode = "block" }]
        """)
        run = xb.start()
        assert run.returncode == 0, journal.text("-u", "xenbackup@vm1")
        # restic's stdin was the snapshot's device, opened by the head start.
        assert_head_start_taken([e for e in journal.entries("-u", "xenbackup@vm1.service")
                                 if e.get("XENBACKUP_VM") == "vm1"], journal, key_check_left=False)
        # No block-mode disk's run can carry the domain config (/etc/xen/vm1.cfg, the seed layout's): the
        # prepare step stored it in place of its key check, before the snapshot.
        told = [str(e.get("MESSAGE", "")) for e in journal.entries("XENBACKUP_VM=vm1")]
        stored = [i for i, m in enumerate(told) if m == "saved domain config /etc/xen/vm1.cfg"]
        created = [i for i, m in enumerate(told) if m.startswith("created ") and " snapshot system/vm1disk" in m]
        assert len(stored) == 1 and created and stored[0] < created[0], told
        with open(tmp_path / "img", "wb") as out:
            env = {**os.environ, "RESTIC_REPOSITORY": "/var/lib/xenbackup/repo",
                   "RESTIC_PASSWORD_FILE": "/etc/xenbackup/restic-password"}
            subprocess.run(["restic", "dump", "latest", "/system-vm1disk.img", "--tag", "mode:block"],
                           stdout=out, env=env, check=True)
        assert sh("sha256sum", str(tmp_path / "img")).stdout.split()[0] == want
        assert our_snapshots() == []
    finally:
        sh("lvremove", "--yes", "system/vm1disk", check=False)
