"""A repository shared with other processes: the backup unit waits for their locks, or fails cleanly."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vmlib.product import PASSWORD, REPO, Journal, Xb, our_mounts, our_snapshots, sh

CONFIG = """
[repository]
lock_wait = {lock_wait}
[vm.vm1]
hypervisor = "none"
snapshot_size = "256M"
disks = [{{ lv = "system/xenvm", mode = "files", path = "vm1" }}]
"""


def lock_files() -> set[str]:
    return {p.name for p in (REPO / "locks").iterdir() if "-tmp-" not in p.name}


@contextmanager
def exclusive_lock() -> Iterator[subprocess.Popen[bytes]]:
    """What a fleet's prune does to everyone else: an exclusive lock, held here by a slow restic check."""
    env = {**os.environ, "RESTIC_REPOSITORY": str(REPO), "RESTIC_PASSWORD_FILE": str(PASSWORD)}
    before = lock_files()
    proc = subprocess.Popen(["restic", "check", "--read-data", "--limit-download", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while lock_files() == before:
        assert proc.poll() is None and time.monotonic() < deadline, "restic check took no lock"
        time.sleep(0.1)
    proc.lock_names = lock_files() - before  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        release(proc)


def release(proc: subprocess.Popen[bytes]) -> None:
    """End the holder as a finished prune would: its process and its lock gone.

    restic stuck in a 1 KiB/s read answers SIGINT only after minutes under TCG, so it is killed and its lock
    file removed, which is all restic's own unlock-on-exit does."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=60)
    for name in proc.lock_names:  # type: ignore[attr-defined]
        (REPO / "locks" / name).unlink(missing_ok=True)


def runs() -> set[str]:
    return {t for s in Xb().snapshots("vm:vm1") for t in s["tags"] if str(t).startswith("run:")}  # type: ignore[union-attr]


def test_backup_waits_for_another_process_s_lock_and_the_journal_names_it(seed_layout, xb: Xb,
                                                                          journal: Journal) -> None:
    xb.write_config(CONFIG.format(lock_wait='"5min"'))
    assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")
    first = runs()
    with_lock = Journal()
    with exclusive_lock() as holder:
        sh("systemctl", "start", "--no-block", "xenbackup@vm1.service")
        deadline = time.monotonic() + 240
        while not [e for e in with_lock.entries("-u", "xenbackup@vm1.service") if "XENBACKUP_LOCK_PID" in e]:
            assert time.monotonic() < deadline, with_lock.text("-u", "xenbackup@vm1.service")
            assert sh("systemctl", "is-active", "xenbackup@vm1.service", check=False).stdout.strip() in (
                "activating", "active"), with_lock.text("-u", "xenbackup@vm1.service")
            time.sleep(1)
        time.sleep(5)  # the unit keeps waiting while the lock is held
        assert sh("systemctl", "is-active", "xenbackup@vm1.service", check=False).stdout.strip() == "activating"
        release(holder)
    assert xb.wait_inactive() == "inactive", with_lock.text("-u", "xenbackup@vm1.service")
    entries = with_lock.entries("-u", "xenbackup@vm1.service")
    waits = [e for e in entries if "XENBACKUP_LOCK_PID" in e]
    assert waits[0]["XENBACKUP_LOCK_PID"] == str(holder.pid)
    assert waits[0]["XENBACKUP_LOCK_HOST"] == socket.gethostname()
    assert f"is locked by an exclusive lock of PID {holder.pid} on {socket.gethostname()}" in str(
        waits[0]["MESSAGE"])
    assert waits[0]["XENBACKUP_PHASE"] == "backup"
    assert any("got the repository lock after waiting" in str(e["MESSAGE"]) for e in entries)
    assert len(runs() - first) == 1
    assert our_snapshots() == [] and our_mounts() == []
    assert sh("restic", "check", env={**os.environ, "RESTIC_REPOSITORY": str(REPO),
                                      "RESTIC_PASSWORD_FILE": str(PASSWORD)}).returncode == 0


def test_past_lock_wait_the_run_fails_cleanly_and_the_next_succeeds(seed_layout, xb: Xb, journal: Journal) -> None:
    xb.write_config(CONFIG.format(lock_wait="15"))
    assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")
    first = runs()
    with exclusive_lock() as holder:
        failed = xb.start()
        text = journal.text("-u", "xenbackup@vm1.service")
        assert failed.returncode != 0, text
        assert f"is locked by an exclusive lock of PID {holder.pid}" in text
        assert "gave up after waiting 15 s ([repository] lock_wait)" in text
        assert our_snapshots() == [] and our_mounts() == [], "the snapshot outlived the failed run"
        release(holder)
    sh("systemctl", "reset-failed", "xenbackup@vm1.service", check=False)
    assert runs() == first, "the failed run left a restic snapshot"
    assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")
    assert len(runs() - first) == 1
    assert not (Path(REPO) / "locks").exists() or lock_files() == set()
