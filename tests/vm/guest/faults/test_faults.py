"""The fault matrix: each fault once, where it hurts; afterwards nothing of ours is left, the origin is
unchanged, earlier backups still pass restic check, and the next run succeeds."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmlib.product import (
    MSG_EXTENDED,
    MSG_OVERFLOW,
    MSG_STALE,
    PASSWORD,
    REPO,
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

BASE = """
[settings]
watch_interval = {interval}
[vm.vm1]
snapshot_size = "{size}"
overflow_threshold = {threshold}
extend_step = "{step}"
disks = [{{ lv = "system/xenvm", mode = "files", path = "vm1" }}]
"""


def config(size: str = "256M", threshold: int = 80, step: str = "10%ORIGIN", interval: int = 5,
           slow: bool = False) -> str:
    """vm1's config; `slow` keeps the run's restic busy with `ballast` while the fault strikes."""
    return (SLOW_UPLOAD if slow else "") + BASE.format(size=size, threshold=threshold, step=step, interval=interval)


def zero_file(layout, mb: int, name: str) -> Path:
    """Blocks of the origin for a writer to overwrite: what they hold does not matter to the snapshot's COW."""
    path = layout.vmdir / name
    sh("dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mb}", "status=none")
    return path


def assert_recovered(xb: Xb, journal: Journal, layout, static: dict[str, str], repo: Path = REPO) -> None:
    """The invariants every fault must leave behind."""
    assert our_snapshots() == [], "a snapshot of ours is left"
    assert our_mounts() == [], "a mount of ours is left"
    assert tree_hashes(layout.vmdir) == static, "the origin changed"
    if (repo / "config").exists():
        restic_check(repo)
    sh("systemctl", "reset-failed", "xenbackup@vm1.service", check=False)
    run = xb.start()
    assert run.returncode == 0, journal.text("-u", "xenbackup@vm1")
    assert our_snapshots() == []


def restic_in(repo: Path, *args: str) -> str:
    env = {"RESTIC_REPOSITORY": str(repo), "RESTIC_PASSWORD_FILE": "/etc/xenbackup/restic-password",
           "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["restic", *args], env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def repo_locks(repo: Path = REPO) -> list[str]:
    return sorted(p.name for p in (repo / "locks").iterdir()) if (repo / "locks").is_dir() else []


def restic_check(repo: Path) -> None:
    restic_in(repo, "check")


def one_line(journal: Journal, unit: str, needle: str) -> str:
    """The journal names the cause in one line."""
    lines = [line for line in journal.text("-u", unit).splitlines() if needle.lower() in line.lower()]
    assert lines, f"no line names {needle!r}:\n" + journal.text("-u", unit)
    return lines[0]


# The baseline's first run (repository init, password, one backup) costs 15-20 s under TCG in each of ten
# tests, and every one of them would make the same repository of the same files: a session's seed layouts
# all hold the same bytes. The first one's product state is kept here and copied back for the next, as long
# as the seed's files and the config are the same.
BASELINE_COPY = Path("/var/tmp/xbtest-faults-baseline")
BASELINE_STATE = (REPO, STATE_DIR, PASSWORD)


def restore_baseline(key: str) -> bool:
    """Put the kept baseline's repository, run records and password back; False if none fits `key`."""
    stamp = BASELINE_COPY / "key"
    if not stamp.is_file() or stamp.read_text() != key:
        return False
    sh("rm", "-rf", *(str(path) for path in BASELINE_STATE))
    for index, path in enumerate(BASELINE_STATE):
        sh("cp", "-a", str(BASELINE_COPY / str(index)), str(path))
    return True


def keep_baseline(key: str) -> None:
    sh("rm", "-rf", str(BASELINE_COPY))
    BASELINE_COPY.mkdir(parents=True)
    for index, path in enumerate(BASELINE_STATE):
        sh("cp", "-a", str(path), str(BASELINE_COPY / str(index)))
    (BASELINE_COPY / "key").write_text(key)


@pytest.fixture
def baseline(seed_layout, xb: Xb, journal: Journal) -> Iterator[dict[str, str]]:
    """One good backup first, so that every fault is also checked against an earlier backup."""
    hashes = tree_hashes(seed_layout.vmdir)
    text = config()
    xb.write_config(text)
    key = json.dumps([hashes, text], sort_keys=True)
    if not restore_baseline(key):
        assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")
        assert len(xb.snapshots("vm:vm1", "mode:files")) == 1
        keep_baseline(key)
    yield hashes


def test_full_volume_group_fails_before_lvcreate(seed_layout, xb: Xb, journal: Journal, baseline) -> None:
    sh("lvcreate", "--yes", "-l", "100%FREE", "-n", "filler", "system")
    try:
        run = xb.start()
        assert run.returncode != 0
        assert "volume group system has" in journal.text("-u", "xenbackup@vm1")
    finally:
        sh("lvremove", "--yes", "system/filler")
    assert_recovered(xb, journal, seed_layout, baseline)


def test_mount_fails(seed_layout, xb: Xb, journal: Journal, baseline) -> None:
    xb.write_config(config().replace("[vm.vm1]", '[vm.vm1]\nmount_options = ["no_such_option_xb"]'))
    before = xb.snapshots("vm:vm1", "mode:files")
    assert xb.start().returncode != 0
    one_line(journal, "xenbackup@vm1", "cannot mount")
    assert xb.snapshots("vm:vm1", "mode:files") == before
    xb.write_config(config())
    assert_recovered(xb, journal, seed_layout, baseline)


REPO_DISK = Path("/mnt/xb-repodisk")


def test_remote_repository_down(seed_layout, xb: Xb, journal: Journal, baseline) -> None:
    xb.write_config('[repository]\nurl = "rest:http://127.0.0.1:9/"\n' + config())
    archived = lvm_archives()
    assert xb.start().returncode != 0
    one_line(journal, "xenbackup@vm1", "connection refused")
    errors = [e for e in journal.entries("-u", "xenbackup@vm1.service") if "connection refused" in str(e["MESSAGE"])]
    # The repository is opened before any snapshot exists: a run that cannot store never touches LVM.
    assert errors and errors[0].get("XENBACKUP_PHASE") == "snapshot", "the error does not name its phase"
    assert lvm_archives() == archived, "the doomed run changed LVM metadata (made a snapshot)"
    xb.write_config(config())
    sh("systemctl", "reset-failed", "xenbackup@vm1.service", check=False)
    assert_recovered(xb, journal, seed_layout, baseline)


def lvm_archives() -> list[str]:
    """LVM archives the VG's metadata before every change (lvcreate, lvremove): a witness that none ran."""
    return sorted(p.name for p in Path("/etc/lvm/archive").glob("system_*"))


def test_wrong_repository_password_never_touches_lvm(seed_layout, xb: Xb, journal: Journal, baseline,
                                                     tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not the repository's password\n")
    wrong.chmod(0o600)
    xb.write_config(f'[repository]\npassword_file = "{wrong}"\n' + config())
    archived = lvm_archives()
    assert archived, "LVM keeps no metadata archives here, so this test could not see an lvcreate"
    assert xb.start().returncode != 0
    one_line(journal, "xenbackup@vm1", "wrong password")
    assert lvm_archives() == archived, "a run with the wrong password made a snapshot"
    xb.write_config(config())
    sh("systemctl", "reset-failed", "xenbackup@vm1.service", check=False)
    assert_recovered(xb, journal, seed_layout, baseline)


@pytest.mark.parametrize("fault", ["unmounted", "read-only"])
def test_repository_unreachable_or_read_only(seed_layout, xb: Xb, journal: Journal, fault: str) -> None:
    # The repository lives on its own "disk" (a bind mount of a directory), as on a real host.
    store = Path("/var/tmp/xb-repodisk")
    store.mkdir(exist_ok=True)
    REPO_DISK.mkdir(exist_ok=True)
    sh("mount", "--bind", str(store), str(REPO_DISK))
    repo = REPO_DISK / "repo"
    try:
        xb.write_config(f'[repository]\nurl = "{repo}"\n' + config())
        assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")
        static = tree_hashes(seed_layout.vmdir)
        earlier = restic_in(repo, "snapshots", "--json")
        if fault == "unmounted":
            sh("umount", str(REPO_DISK))
            assert xb.start().returncode != 0
            one_line(journal, "xenbackup@vm1", "is its disk mounted")
            assert not repo.exists(), "a new repository was made on the wrong filesystem"
            sh("mount", "--bind", str(store), str(REPO_DISK))
        else:
            sh("mount", "-o", "remount,bind,ro", str(REPO_DISK))
            assert xb.start().returncode != 0
            one_line(journal, "xenbackup@vm1", "read-only file system")
            sh("mount", "-o", "remount,bind,rw", str(REPO_DISK))
        assert restic_in(repo, "snapshots", "--json") == earlier, "the failed run changed the earlier backups"
        sh("systemctl", "reset-failed", "xenbackup@vm1.service", check=False)
        assert_recovered(xb, journal, seed_layout, static, repo=repo)
    finally:
        sh("umount", str(REPO_DISK), check=False)
        sh("rm", "-rf", str(store))


def test_restic_killed_mid_backup(seed_layout, xb: Xb, journal: Journal, baseline) -> None:
    big = ballast(seed_layout.vmdir)
    static = tree_hashes(seed_layout.vmdir)
    xb.write_config(config(slow=True))
    sh("systemctl", "start", "--no-block", "xenbackup@vm1.service")
    xb.wait_for_restic(journal)
    time.sleep(1)
    sh("pkill", "-KILL", "-x", "restic")
    assert xb.wait_inactive() == "failed"
    assert "restic killed by SIGKILL" in journal.text("-u", "xenbackup@vm1")
    xb.write_config(config())
    assert_recovered(xb, journal, seed_layout, static)
    big.unlink()


def test_systemctl_stop_mid_backup(seed_layout, xb: Xb, journal: Journal, baseline) -> None:
    big = ballast(seed_layout.vmdir)
    static = tree_hashes(seed_layout.vmdir)
    xb.write_config(config(slow=True))
    sh("systemctl", "start", "--no-block", "xenbackup@vm1.service")
    xb.wait_for_restic(journal)
    sh("systemctl", "stop", "xenbackup@vm1.service", timeout=400)
    text = journal.text("-u", "xenbackup@vm1")
    assert "cleanup after result=" in text
    xb.write_config(config())
    assert_recovered(xb, journal, seed_layout, static)
    big.unlink()


def test_start_timeout_cleans_up(seed_layout, xb: Xb, journal: Journal, baseline) -> None:
    big = ballast(seed_layout.vmdir)
    static = tree_hashes(seed_layout.vmdir)
    xb.write_config(config(slow=True))
    dropin = Path("/run/systemd/system/xenbackup@vm1.service.d")
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "short.conf").write_text("[Service]\nTimeoutStartSec=8s\n")
    sh("systemctl", "daemon-reload")
    try:
        run = xb.start()
        assert run.returncode != 0
        assert "cleanup after result=timeout" in journal.text("-u", "xenbackup@vm1")
    finally:
        sh("rm", "-rf", str(dropin))
        sh("systemctl", "daemon-reload")
    xb.write_config(config())
    assert_recovered(xb, journal, seed_layout, static)
    big.unlink()


def test_repository_disk_full(seed_layout, xb: Xb, journal: Journal) -> None:
    repo = Path("/mnt/xb-small-repo")
    repo.mkdir(exist_ok=True)
    # Room for the first backup (about 18 MB), not for the ballast as well.
    sh("mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(repo))
    try:
        xb.write_config(f'[repository]\nurl = "{repo}/r"\n' + config())
        assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")
        big = ballast(seed_layout.vmdir, mib=40)
        static = tree_hashes(seed_layout.vmdir)
        run = xb.start()
        assert run.returncode != 0
        assert "no space left on device" in journal.text("-u", "xenbackup@vm1").lower()
        assert our_snapshots() == [] and our_mounts() == []
        assert tree_hashes(seed_layout.vmdir) == static
        env_repo = {"RESTIC_REPOSITORY": f"{repo}/r", "RESTIC_PASSWORD_FILE": "/etc/xenbackup/restic-password"}
        check = subprocess.run(["restic", "check"], env={**env_repo, "PATH": "/usr/bin:/bin"}, capture_output=True,
                               text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        big.unlink()
        sh("systemctl", "reset-failed", "xenbackup@vm1.service", check=False)
        assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")
    finally:
        sh("umount", str(repo))


def writer(path: Path, total_mb: int, chunk_mb: int, pause: float, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        with open(path, "r+b") as f:
            for i in range(total_mb // chunk_mb):
                if stop.is_set():
                    return
                f.seek(i * chunk_mb << 20)
                f.write(bytes([i % 251]) * (chunk_mb << 20))
                f.flush()
                os.fsync(f.fileno())
                time.sleep(pause)
    t = threading.Thread(target=run)
    t.start()
    return t


def test_overflow_discards_the_run(seed_layout, xb: Xb, journal: Journal, baseline) -> None:
    ballast(seed_layout.vmdir)
    # Three times the snapshot's size, written while restic uploads the ballast.
    target = zero_file(seed_layout, 48, "rewritten.img")
    before = xb.snapshots("vm:vm1", "mode:files")
    xb.write_config(config(size="16M", threshold=99, step="4M", interval=3, slow=True))
    sh("systemctl", "start", "--no-block", "xenbackup@vm1.service")
    xb.wait_for_restic(journal)
    stop = threading.Event()
    writer(target, 48, 8, 0.0, stop).join()
    assert xb.wait_inactive(timeout=600) == "failed"
    entries = journal.entries("-u", "xenbackup@vm1.service")
    overflow = [e for e in entries if e.get("MESSAGE_ID") == MSG_OVERFLOW]
    assert overflow, journal.text("-u", "xenbackup@vm1")
    assert any(e.get("XENBACKUP_SUGGESTED_SIZE") for e in overflow)
    assert xb.snapshots("vm:vm1", "mode:files") == before, "an overflowed run left a restic snapshot"
    record = json.loads((STATE_DIR / "vm1.json").read_text())
    assert record["result"] == "overflow" and record["peak_fill"] == 100.0
    xb.write_config(config())
    assert_recovered(xb, journal, seed_layout, tree_hashes(seed_layout.vmdir))


def test_auto_extend_saves_a_filling_snapshot(seed_layout, xb: Xb, journal: Journal, baseline) -> None:
    ballast(seed_layout.vmdir)
    target = zero_file(seed_layout, 48, "rewritten.img")
    xb.write_config(config(size="64M", threshold=40, step="64M", interval=1, slow=True))
    sh("systemctl", "start", "--no-block", "xenbackup@vm1.service")
    xb.wait_for_restic(journal)
    stop = threading.Event()
    w = writer(target, 48, 4, 0.5, stop)
    state = xb.wait_inactive(timeout=600)
    stop.set()
    w.join()
    text = journal.text("-u", "xenbackup@vm1")
    assert state == "inactive", text
    extended = [e for e in journal.entries("-u", "xenbackup@vm1.service") if e.get("MESSAGE_ID") == MSG_EXTENDED]
    assert extended, text
    record = json.loads((STATE_DIR / "vm1.json").read_text())
    assert record["result"] == "success" and 40 <= record["peak_fill"] < 100


def pool_fill(vg: str, pool: str) -> float:
    out = sh("lvs", "--noheadings", "-o", "data_percent,metadata_percent", f"{vg}/{pool}").stdout.split()
    return max(float(value) for value in out)


def thin_config(layout, slow: bool = False) -> str:
    return (SLOW_UPLOAD if slow else "") + f"""
        [settings]
        watch_interval = 1
        [vm.vm1]
        disks = [{{ lv = "{layout.vg}/{layout.lv}", mode = "files", path = "." }}]
    """


def test_thin_pool_filling_stops_the_run_before_it_is_full(thin_layout, xb: Xb, journal: Journal) -> None:
    vg, pool, mnt = thin_layout.vg, thin_layout.pool, thin_layout.mountpoint
    xb.write_config(thin_config(thin_layout))
    assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")
    earlier = xb.snapshots("vm:vm1", "mode:files")
    ballast(mnt / "data")
    # Most of the pool taken before the run, in one write of zeros (a thin pool allocates them all the same):
    # the writer below then fills only the last part while restic uploads the ballast.
    data_percent = float(sh("lvs", "--noheadings", "-o", "data_percent", f"{vg}/{pool}").stdout)
    pool_mib = int(float(sh("lvs", "--noheadings", "--units", "m", "--nosuffix", "-o", "lv_size",
                            f"{vg}/{pool}").stdout))
    prefill_mib = int(pool_mib * (80 - data_percent) / 100)
    sh("dd", "if=/dev/zero", f"of={mnt / 'prefill.img'}", "bs=4M", f"count={prefill_mib // 4}", "oflag=direct",
       "status=none")
    sh("sync")
    assert 75 < pool_fill(vg, pool) < 90
    static = tree_hashes(mnt / "data")
    xb.write_config(thin_config(thin_layout, slow=True))
    sh("systemctl", "start", "--no-block", "xenbackup@vm1.service")
    xb.wait_for_restic(journal)
    # A VM writing new data while the snapshot pins the old blocks: the pool fills. The writer stops at 97 %
    # by itself, so the test never lets the pool run out under the origin.
    chunk = bytes(range(256)) * (8 << 12)
    with open(mnt / "filler.img", "wb") as filler:
        while pool_fill(vg, pool) < 97:
            filler.write(chunk)
            filler.flush()
            os.fsync(filler.fileno())
            if sh("systemctl", "is-active", "xenbackup@vm1.service", check=False).stdout.strip() != "activating":
                break
    assert xb.wait_inactive(timeout=600) == "failed", journal.text("-u", "xenbackup@vm1")
    line = one_line(journal, "xenbackup@vm1", f"thin pool {vg}/{pool} is")
    assert "stopping the backup" in line
    assert any(e.get("MESSAGE_ID") == MSG_OVERFLOW for e in journal.entries("-u", "xenbackup@vm1.service"))
    assert xb.snapshots("vm:vm1", "mode:files") == earlier, "a run stopped for a filling pool left a backup"
    assert our_snapshots() == [] and our_mounts() == []
    assert pool_fill(vg, pool) < 100

    (mnt / "filler.img").unlink()
    (mnt / "prefill.img").unlink()
    sh("sync")  # ext4 frees the blocks at its next commit; only then can fstrim hand them back to the pool
    sh("fstrim", str(mnt))
    assert pool_fill(vg, pool) < 60
    assert tree_hashes(mnt / "data") == static, "the origin changed"
    sh("systemctl", "reset-failed", "xenbackup@vm1.service", check=False)
    xb.write_config(thin_config(thin_layout))
    assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")
    assert len(xb.snapshots("vm:vm1", "mode:files")) == len(earlier) + 1
    assert our_snapshots() == []
    xb.restic("check")


def test_two_simultaneous_starts_never_both_snapshot(seed_layout, xb: Xb, journal: Journal) -> None:
    xb.write_config(config(slow=True).replace("[vm.vm1]", '[vm."web-01"]'))
    ballast(seed_layout.vmdir)
    escaped = sh("systemd-escape", "web-01").stdout.strip()
    units = ["xenbackup@web-01.service", f"xenbackup@{escaped}.service"]
    procs = [subprocess.Popen(["systemctl", "start", u], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for u in units]
    peak = 0
    while any(p.poll() is None for p in procs):
        peak = max(peak, len(our_snapshots()))
        time.sleep(0.2)
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0 and codes[1] != 0, codes
    assert peak == 1
    text = journal.text("-u", units[0], "-u", units[1])
    assert "is already running" in text or "holds the lock" in text
    assert len(xb.snapshots("vm:web-01", "mode:files")) == 1
    assert our_snapshots() == []
    for u in units:
        sh("systemctl", "reset-failed", u, check=False)


def test_max_parallel_one_serialises_three_vms(seed_layout, xb: Xb, journal: Journal) -> None:
    for name in ("vma", "vmb", "vmc"):
        sh("lvcreate", "--yes", "-L", "64M", "-n", name, "system")
        sh("mkfs.ext4", "-q", f"/dev/system/{name}")
    free = int(sh("vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_free", "system").stdout)
    # Room for exactly one 48M snapshot; the filler takes the rest.
    filler_mb = free // (1 << 20) - 80
    sh("lvcreate", "--yes", "-L", f"{filler_mb}M", "-n", "filler", "system")
    try:
        xb.write_config("[settings]\nmax_parallel = 1\n" + "".join(
            f'[vm.{n}]\nhypervisor = "none"\nsnapshot_size = "48M"\ndisks = [{{ lv = "system/{n}", path = "." }}]\n'
            for n in ("vma", "vmb", "vmc")))
        procs = [subprocess.Popen(["systemctl", "start", f"xenbackup@{n}.service"]) for n in ("vma", "vmb", "vmc")]
        peak = 0
        while any(p.poll() is None for p in procs):
            peak = max(peak, len(our_snapshots()))
            time.sleep(0.2)
        assert [p.returncode for p in procs] == [0, 0, 0], journal.text("-u", "xenbackup@*")
        assert peak == 1
        assert "waiting for a snapshot slot" in journal.text("-u", "xenbackup@vm*")
        for n in ("vma", "vmb", "vmc"):
            assert len(xb.snapshots(f"vm:{n}")) == 1
    finally:
        for n in ("filler", "vma", "vmb", "vmc"):
            sh("lvremove", "--yes", f"system/{n}", check=False)


def kill_run_during_cleanup(xb: Xb, journal: Journal) -> str:
    """Start vm1, kill restic holding its repository lock, keep cleanup retrying lvremove (the snapshot
    held open), then SIGKILL the cleanup too: it leaves both a snapshot and a stale restic lock."""
    sh("systemctl", "start", "--no-block", "xenbackup@vm1.service")
    xb.wait_for_restic(journal)
    (snap,) = our_snapshots()
    deadline = time.monotonic() + 60
    while not repo_locks():
        assert time.monotonic() < deadline, "restic never took its repository lock"
        time.sleep(0.1)
    holder = subprocess.Popen(["sleep", "600"], stdin=open(f"/dev/{snap}", "rb"))  # noqa: SIM115
    try:
        sh("pkill", "-KILL", "-x", "restic")
        deadline = time.monotonic() + 120
        while "is still in use, retrying" not in journal.text("-u", "xenbackup@vm1"):
            assert time.monotonic() < deadline, journal.text("-u", "xenbackup@vm1")
            time.sleep(0.5)
        sh("systemctl", "kill", "-s", "KILL", "xenbackup@vm1.service")
        xb.wait_inactive()
    finally:
        holder.kill()
        holder.wait()
    return snap


def test_cleanup_killed_then_next_run_and_boot_sweep_remove_leftovers(seed_layout, xb: Xb, journal: Journal,
                                                                         baseline) -> None:
    ballast(seed_layout.vmdir)
    static = tree_hashes(seed_layout.vmdir)
    xb.write_config(config(slow=True))
    snap = kill_run_during_cleanup(xb, journal)
    assert our_snapshots() == [snap], "the test needs the killed cleanup to have left its snapshot"
    assert repo_locks(), "the test needs the killed restic to have left its lock"
    sh("systemctl", "start", "xenbackup-cleanup.service")
    stale = [e for e in journal.entries("-u", "xenbackup-cleanup.service") if e.get("MESSAGE_ID") == MSG_STALE]
    assert stale and our_snapshots() == []
    assert repo_locks() == [], "the sweep left the interrupted run's restic lock"
    xb.write_config(config())
    assert_recovered(xb, journal, seed_layout, static)


def test_a_killed_run_does_not_keep_its_snapshot_slot(seed_layout, xb: Xb, journal: Journal) -> None:
    sh("lvcreate", "--yes", "-L", "64M", "-n", "vmb", "system")
    sh("mkfs.ext4", "-q", "/dev/system/vmb")
    try:
        def two_vms(slow: bool) -> str:
            return (config(slow=slow).replace("[settings]\n", "[settings]\nmax_parallel = 1\n", 1)
                    + '[vm.vmb]\nhypervisor = "none"\nsnapshot_size = "32M"\n'
                    + 'disks = [{ lv = "system/vmb", path = "." }]\n')

        xb.write_config(two_vms(slow=True))
        ballast(seed_layout.vmdir)
        kill_run_during_cleanup(xb, journal)  # vm1's run dies holding the only slot
        xb.write_config(two_vms(slow=False))
        assert Path("/run/xenbackup/slots/vm1.slot").exists(), "the test needs the dead run's slot file left"
        started = time.monotonic()
        assert xb.start("vmb").returncode == 0, journal.text("-u", "xenbackup@vmb")
        assert "waiting for a snapshot slot" not in journal.text("-u", "xenbackup@vmb")
        assert time.monotonic() - started < 120
        sh("systemctl", "reset-failed", "xenbackup@vm1.service", check=False)
        assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")
        assert our_snapshots() == [] and our_mounts() == []
    finally:
        sh("systemctl", "reset-failed", "xenbackup@vmb.service", check=False)
        sh("lvremove", "--yes", "system/vmb", check=False)


def test_a_snapshot_made_by_a_human_is_never_touched(seed_layout, xb: Xb, journal: Journal) -> None:
    sh("lvcreate", "--yes", "-s", "-L", "32M", "-n", "admin-snap", "system/xenvm")
    try:
        xb.write_config(config())
        assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")
        sh("systemctl", "start", "xenbackup-cleanup.service")
        assert "admin-snap" in sh("lvs", "--noheadings", "-o", "lv_name", "system").stdout
    finally:
        sh("lvremove", "--yes", "system/admin-snap", check=False)
