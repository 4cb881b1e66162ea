"""Repository locks held by other processes and hosts, with real restic on a local repository."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from xenbackup import config, repository
from xenbackup.actions.backup import CLEANUP_LOCK_WAIT, forget_run
from xenbackup.actions.context import Context
from xenbackup.config import RepositoryConfig
from xenbackup.names import restic_tags as tags_for
from xenbackup.repository import (
    Lock,
    LockHolder,
    RepositoryLocked,
    Restic,
    parse_lock_conflict,
    removable_locks,
)
from xenbackup.state import Owner, RunState


def test_restic_0_14_lock_errors_name_the_holder(data: Path) -> None:
    shared = parse_lock_conflict((data / "restic-check-locked-by-backup.stderr").read_text())
    assert shared == LockHolder(pid=20096, host="vm", user="root", exclusive=False, since="2026-11-29 21:50:12")
    exclusive = parse_lock_conflict((data / "restic-backup-locked-exclusively.stderr").read_text())
    assert exclusive is not None and exclusive.exclusive and exclusive.pid == 19126
    other = parse_lock_conflict((data / "restic-forget-locked-by-other-host.stderr").read_text())
    assert other is not None and (other.host, other.pid) == ("xen-b", 27471)
    assert other.describe() == "a lock of PID 27471 on xen-b (root, taken 2026-11-29 21:50:38)"
    assert parse_lock_conflict((data / "restic-backup-readonly-repo.stderr").read_text()) is None


def _lock(host: str, pid: int, minutes_old: float, now: datetime) -> Lock:
    return Lock(id=f"{host}{pid}", time=now - timedelta(minutes=minutes_old), exclusive=False, hostname=host,
                username="root", pid=pid)


def test_unlock_is_never_run_while_it_would_remove_another_hosts_lock() -> None:
    now = datetime(2026, 11, 29, 22, 0, tzinfo=UTC)
    dead_here = _lock("xen-a", 100, 1, now)
    live_here = _lock("xen-a", 200, 1, now)
    fresh_there = _lock("xen-b", 300, 1, now)
    old_there = _lock("xen-b", 400, 31, now)  # restic's unlock calls it stale after 30 min, from any host
    alive = {200}.__contains__
    assert removable_locks([dead_here, live_here, fresh_there], "xen-a", now, alive) == [dead_here]
    assert removable_locks([dead_here, old_there], "xen-a", now, alive) is None
    assert removable_locks([live_here, fresh_there], "xen-a", now, alive) == []
    # A live process of this host whose lock restic would call stale is kept too.
    assert removable_locks([dead_here, _lock("xen-a", 200, 45, now)], "xen-a", now, alive) is None


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[tuple[Restic, dict[str, str]]]:
    cfg = RepositoryConfig(url=str(tmp_path / "repo"), password_file=str(tmp_path / "pw"), environment_file=None,
                           cache_dir=str(tmp_path / "cache"), host="xen-a", compression="auto", lock_wait=30)
    restic = Restic(cfg, credentials_dir="")
    restic.ensure_initialized()
    env = {"PATH": os.environ["PATH"], "RESTIC_REPOSITORY": cfg.url, "RESTIC_PASSWORD_FILE": cfg.password_file,
           "RESTIC_CACHE_DIR": cfg.cache_dir, "HOME": str(tmp_path)}
    yield restic, env


def _locks_dir(restic: Restic) -> Path:
    return Path(restic.cfg.url) / "locks"


def _lock_files(restic: Restic) -> set[str]:
    # restic writes NAME-tmp-N first and renames it: only then is it a lock.
    return {name for name in os.listdir(_locks_dir(restic)) if "-tmp-" not in name}


def _hold(restic: Restic, env: dict[str, str], argv: list[str]) -> subprocess.Popen[bytes]:
    """Start a restic that keeps a lock until told otherwise; return once its lock is in the repository."""
    before = _lock_files(restic)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.monotonic() + 30
    while _lock_files(restic) == before:
        assert proc.poll() is None, f"{argv} ended before it took its lock"
        assert time.monotonic() < deadline, f"{argv} took no lock"
        time.sleep(0.05)
    return proc


def _backup_holding_lock(restic: Restic, env: dict[str, str], host: str | None = None) -> subprocess.Popen[bytes]:
    # restic backup --stdin holds its (shared) lock while it waits for stdin to end.
    argv = ["restic", "backup", "--stdin", "--stdin-filename", "held", "-q"]
    if host is not None:
        # Another host: restic records the kernel's host name in its lock; a UTS namespace gives it another.
        argv = ["unshare", "--map-root-user", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *argv]
    return _hold(restic, env, argv)


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(repository, "LOCK_RETRY_FIRST", 0.3)
    monkeypatch.setattr(repository, "LOCK_RETRY_MAX", 0.5)


def test_check_waits_for_a_backup_s_lock_and_names_its_holder(repo, quick_retries, caplog) -> None:
    restic, env = repo
    holder = _backup_holding_lock(restic, env)
    caplog.set_level(logging.INFO, logger="xenbackup.repository")
    release_at = time.monotonic() + 1.5

    def release_later() -> None:
        time.sleep(max(0.0, release_at - time.monotonic()))
        assert holder.stdin is not None
        holder.stdin.write(b"held")  # an empty stdin would make restic fail
        holder.stdin.close()
        holder.wait()

    releaser = threading.Thread(target=release_later)
    releaser.start()
    restic.check()
    releaser.join()
    assert time.monotonic() >= release_at, "check ran while the backup held its lock"
    waits = [r for r in caplog.records if "is locked by" in r.getMessage()]
    assert waits, "no journal line said whose lock the check waited for"
    assert f"PID {holder.pid} on " in waits[0].getMessage()
    assert waits[0].fields["lock_pid"] == holder.pid  # type: ignore[attr-defined]
    assert any("got the repository lock after waiting" in r.getMessage() for r in caplog.records)
    assert holder.returncode == 0


def test_backup_waits_for_an_exclusive_lock(repo, quick_retries, tmp_path: Path) -> None:
    restic, env = repo
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(os.urandom(300_000))
    restic.backup(["data"], tags_for("xen-a", "vm1", "system/xenvm", "files", "r1"), "xen-a", lambda p: None,
                  cwd=str(src))
    # restic check reading every pack at 1 KiB/s holds its exclusive lock until interrupted.
    checker = _hold(restic, env, ["restic", "check", "--read-data", "--limit-download", "1"])
    release_at = time.monotonic() + 1.5

    def interrupt_later() -> None:
        time.sleep(max(0.0, release_at - time.monotonic()))
        checker.send_signal(signal.SIGINT)  # restic removes its lock on SIGINT
        checker.wait()

    t = threading.Thread(target=interrupt_later)
    t.start()
    summary = restic.backup(["data"], tags_for("xen-a", "vm1", "system/xenvm", "files", "r2"), "xen-a",
                            lambda p: None, cwd=str(src))
    t.join()
    assert time.monotonic() >= release_at, "the backup ran while check held its exclusive lock"
    assert [s.tag_value("run") for s in restic.snapshots(["xenbackup"])] == ["r1", "r2"]
    assert summary.snapshot_id


def test_past_lock_wait_the_command_fails_naming_the_holder(repo, quick_retries) -> None:
    restic, env = repo
    holder = _backup_holding_lock(restic, env)
    impatient = Restic(replace(restic.cfg, lock_wait=2), credentials_dir="")
    start = time.monotonic()
    try:
        with pytest.raises(RepositoryLocked, match=rf"is locked by a lock of PID {holder.pid} on .*gave up after "
                                                   r"waiting 2 s \(\[repository\] lock_wait\)") as caught:
            impatient.check()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()
    assert 2 <= time.monotonic() - start < 10
    assert caught.value.holder.pid == holder.pid


def test_a_dead_restic_s_lock_on_this_host_is_cleared_and_the_command_runs(repo) -> None:
    restic, env = repo
    killed = _backup_holding_lock(restic, env)
    killed.kill()
    killed.wait()
    (stale,) = os.listdir(_locks_dir(restic))
    no_wait = Restic(replace(restic.cfg, lock_wait=0), credentials_dir="")
    no_wait.check()  # would fail at once if the stale lock were still there
    assert stale not in os.listdir(_locks_dir(restic))


def test_another_host_s_lock_is_never_removed(repo, quick_retries) -> None:
    restic, env = repo
    other = _backup_holding_lock(restic, env, host="xen-b")
    other.kill()  # its process is gone, but on another host xenbackup cannot know that
    other.wait()
    (foreign,) = os.listdir(_locks_dir(restic))
    assert restic.unlock_stale() == []
    impatient = Restic(replace(restic.cfg, lock_wait=1), credentials_dir="")
    with pytest.raises(RepositoryLocked, match="on xen-b"):
        impatient.check()
    assert os.listdir(_locks_dir(restic)) == [foreign]


def _fake_restic(tmp_path: Path, version: str) -> Path:
    """A restic that reports a version and records every argv; the real one cannot pretend to be 0.16."""
    fake = tmp_path / f"restic-{version}"
    calls = tmp_path / f"calls-{version}"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n[ "$1" = version ] && echo "restic {version} compiled with '
                    f'go1.21 on linux/amd64"\n[ "$1" = snapshots ] || [ "$3" = snapshots ] && echo "[]"\nexit 0\n')
    fake.chmod(0o755)
    return fake


def test_restic_0_16_waits_itself_with_retry_lock(tmp_path: Path) -> None:
    cfg = RepositoryConfig(url="sftp:b@h:/r", password_file=str(tmp_path / "pw"), environment_file=None,
                           cache_dir=str(tmp_path / "c"), host="xen-a", compression="auto", lock_wait=5400)
    new = Restic(cfg, str(_fake_restic(tmp_path, "0.16.4")), credentials_dir="")
    new.snapshots()
    new.check()
    assert (tmp_path / "calls-0.16.4").read_text().splitlines() == [
        "version", "--retry-lock 5400s snapshots --json --host xen-a", "--retry-lock 5400s check"]
    old = Restic(cfg, str(_fake_restic(tmp_path, "0.14.0")), credentials_dir="")
    old.snapshots()
    old.check()
    assert (tmp_path / "calls-0.14.0").read_text().splitlines() == [
        "version", "snapshots --json --host xen-a", "check"]


def test_restic_version_is_asked_once_per_binary_across_processes(tmp_path: Path) -> None:
    """The snapshot step asks; the backup step, a new process inside the snapshot's life, reads the answer.
    A replaced binary (an upgrade) is asked again."""
    from xenbackup import repository

    cfg = RepositoryConfig(url="sftp:b@h:/r", password_file=str(tmp_path / "pw"), environment_file=None,
                           cache_dir=str(tmp_path / "c"), host="xen-a", compression="auto", lock_wait=60)
    fake = _fake_restic(tmp_path, "0.16.4")
    cache = str(tmp_path / "state" / "restic-version.json")

    def fresh_process_asks() -> list[str]:
        repository._retry_lock_support.clear()
        (tmp_path / "calls-0.16.4").unlink(missing_ok=True)
        Restic(cfg, str(fake), credentials_dir="", version_cache=cache).snapshots()
        return (tmp_path / "calls-0.16.4").read_text().splitlines()

    assert fresh_process_asks()[0] == "version"
    assert fresh_process_asks() == ["--retry-lock 60s snapshots --json --host xen-a"]
    fake.write_text(fake.read_text().replace("0.16.4 compiled", "0.14.0 compiled") + "\n")
    assert fresh_process_asks() == ["version", "snapshots --json --host xen-a"]


def test_a_shorter_wait_for_cleanup_never_lengthens_it(repo, quick_retries) -> None:
    restic, env = repo
    assert restic.waiting_at_most(60).cfg.lock_wait == 30
    holder = _backup_holding_lock(restic, env)
    start = time.monotonic()
    try:
        with pytest.raises(RepositoryLocked):
            restic.waiting_at_most(1).check()
    finally:
        assert holder.stdin is not None
        holder.stdin.write(b"held")
        holder.stdin.close()
        holder.wait()
    assert time.monotonic() - start < 10
    assert restic.cfg.lock_wait == 30


def test_cleanup_forgets_an_overflowed_run_within_its_own_short_wait(repo, quick_retries) -> None:
    restic, env = repo
    state = RunState(vm="vm1", run_id="20261130T010000-abcd", owner=Owner.current(), started=time.time(),
                     restic_snapshots=("0" * 64,))
    holder = _backup_holding_lock(restic, env)
    start = time.monotonic()
    try:
        # forget needs the exclusive lock; a shared one held elsewhere makes it wait, here for 1 s, not 30.
        with pytest.raises(RepositoryLocked):
            forget_run(restic.waiting_at_most(1), state, "test")
    finally:
        assert holder.stdin is not None
        holder.stdin.write(b"held")
        holder.stdin.close()
        holder.wait()
    assert time.monotonic() - start < 10
    assert CLEANUP_LOCK_WAIT < 300, "cleanup's wait must leave room inside TimeoutStopSec=5min"


def _one_vm_context(tmp_path: Path, repository: str, commands: str = "") -> Context:
    """vm1 in block mode on this repository ([repository] lines), with no snapshot of ours left anywhere."""
    lvs = tmp_path / "lvs"
    lvs.write_text("#!/bin/sh\necho '{\"report\": [{\"lv\": []}]}'\n")
    lvs.chmod(0o755)
    path = tmp_path / "xenbackup.toml"
    path.write_text(f"""
[commands]
lvs = "{lvs}"
{commands}[repository]
{repository}[settings]
runtime_dir = "{tmp_path / 'run'}"
state_dir = "{tmp_path / 'state'}"
metrics_file = ""
[vm.vm1]
hypervisor = "none"
disks = [{{ lv = "system/vm1", mode = "block" }}]
""")
    return Context.from_config(config.load(str(path)))


def test_a_good_run_after_a_failed_one_clears_the_lock_the_failure_could_not(tmp_path: Path, repo) -> None:
    # Measured in the fleet suite: radosgw went down mid-backup, restic died with its lock still in the
    # bucket, and that run's cleanup could not reach the repository to clear it. The next run succeeded under
    # its shared lock, and `restic check` then met the dead lock.
    from xenbackup.actions.backup import step_cleanup
    from xenbackup.actions.record import RunResult

    restic, env = repo
    holder = _backup_holding_lock(restic, env)
    holder.kill()
    holder.wait()
    assert len(_lock_files(restic)) == 1
    ctx = _one_vm_context(tmp_path, f"""
url = "{restic.cfg.url}"
password_file = "{restic.cfg.password_file}"
cache_dir = "{restic.cfg.cache_dir}"
""")
    vm = ctx.cfg.vm("vm1")
    ctx.store.write_record("vm1", {"vm": "vm1", "result": "success", "finished": 1.0})
    assert step_cleanup(ctx, vm, RunResult.SUCCESS) == 0
    assert len(_lock_files(restic)) == 1, "after a good run, a good run does not list the locks"
    ctx.store.write_record("vm1", {"vm": "vm1", "result": "exit-code", "finished": 2.0})
    assert step_cleanup(ctx, vm, RunResult.SUCCESS) == 0
    assert _lock_files(restic) == set()


def test_cleanup_gives_up_on_an_unreachable_repository_s_locks_within_its_limit(tmp_path: Path, monkeypatch,
                                                                                 caplog) -> None:
    # A remote repository that does not answer (an endpoint behind a firewall that drops packets) keeps restic
    # 0.14 retrying for minutes: ten tries with backoff, each waiting for its connection to time out. The
    # failed run's cleanup would sit in "deactivating" all that time; the fake hangs like that.
    from xenbackup.actions import backup
    from xenbackup.actions.record import RunResult

    monkeypatch.setattr(backup, "CLEANUP_GIVE_UP_AFTER", 1)
    hanging = tmp_path / "restic"
    hanging.write_text('#!/bin/sh\n[ "$1" = version ] && { echo "restic 0.14.0 compiled with go1.19"; exit 0; }\n'
                       f'echo "$*" >> {tmp_path / "restic-calls.log"}\nexec sleep 60\n')
    hanging.chmod(0o755)
    (tmp_path / "password").write_text("pw\n")
    ctx = _one_vm_context(tmp_path, f"""
url = "s3:http://127.0.0.1:9/bucket"
password_file = "{tmp_path / 'password'}"
""", f'restic = "{hanging}"\n')
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert backup.step_cleanup(ctx, ctx.cfg.vm("vm1"), RunResult.EXIT_CODE) == 0
    # 1 s, then 5 s of grace: the fake, like cleanup's restic, ignores SIGTERM.
    assert time.monotonic() - start < 15, (tmp_path / "restic-calls.log").read_text() + caplog.text
    assert any("could not clear stale repository locks" in r.getMessage() and "timed out after 1 s" in r.getMessage()
               for r in caplog.records), caplog.text
