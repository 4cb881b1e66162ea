from __future__ import annotations

import json
import os
import stat

import pytest

from xenbackup.config import RepositoryConfig
from xenbackup.repository import (
    BackupSummary,
    Progress,
    RepositoryError,
    Restic,
    parse_progress,
    parse_snapshots,
    tags_for,
)


def repo(tmp_path, url: str | None = None, env_file: str | None = None) -> RepositoryConfig:
    return RepositoryConfig(url=url or str(tmp_path / "repo"), password_file=str(tmp_path / "etc" / "pw"),
                            environment_file=env_file, cache_dir=str(tmp_path / "cache"), host="",
                            compression="auto")


def test_status_and_summary_lines_are_parsed() -> None:
    status = parse_progress(json.dumps({"message_type": "status", "percent_done": 0.25, "total_bytes": 400,
                                        "bytes_done": 100, "seconds_remaining": 30, "files_done": 2}))
    assert status == Progress(percent=25.0, bytes_done=100, total_bytes=400, seconds_remaining=30, files_done=2)
    summary = parse_progress('{"message_type":"summary","files_new":3,"data_added":3147,'
                             '"total_files_processed":3,"total_bytes_processed":10,"total_duration":0.2,'
                             '"snapshot_id":"ff376820"}')
    assert summary == BackupSummary("ff376820", 3147, 10, 3, 0.2)
    assert parse_progress("not json") is None
    assert parse_progress('{"message_type":"verbose_status"}') is None


def test_stdin_status_without_total_has_no_percent() -> None:
    p = parse_progress('{"message_type":"status","percent_done":0,"bytes_done":5}')
    assert isinstance(p, Progress) and p.percent is None


def test_snapshots_json() -> None:
    snaps = parse_snapshots('[{"time":"2026-11-26T12:07:38Z","paths":["/x"],"hostname":"h",'
                            '"tags":["vm:vm1","run:r1"],"id":"ff3768204ca4","short_id":"ff376820"}]')
    assert snaps[0].tag_value("vm") == "vm1" and snaps[0].tag_value("disk") is None
    with pytest.raises(RepositoryError):
        parse_snapshots('{"oops": 1}')


def test_backup_argv_files_and_stdin(tmp_path) -> None:
    r = Restic(repo(tmp_path), "restic", credentials_dir="")
    tags = tags_for("h", "vm1", "system/xenvm", "files", "r1")
    argv = r.backup_argv(["vm1"], tags, "h")
    assert argv[:4] == ["restic", "backup", "--json", "--host"]
    assert argv[-3:] == ["--one-file-system", "--", "vm1"]
    for t in ("xenbackup", "vm:vm1", "disk:system/xenvm", "mode:files", "run:r1", "host:h"):
        assert ["--tag", t] == argv[argv.index(t) - 1: argv.index(t) + 1]
    stdin = r.backup_argv([], tags, "h", stdin_filename="system-web.img")
    assert stdin[-3:] == ["--stdin", "--stdin-filename", "system-web.img"]


def test_password_comes_from_credential_first(tmp_path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "restic-password").write_text("from-credential\n")
    r = Restic(repo(tmp_path), credentials_dir=str(creds))
    assert r.env()["RESTIC_PASSWORD_FILE"] == str(creds / "restic-password")
    assert "from-credential" not in json.dumps(r.env())


def test_missing_local_password_is_generated_0600(tmp_path) -> None:
    r = Restic(repo(tmp_path), credentials_dir="")
    path = r.ensure_password()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path) as f:
        assert len(f.read().strip()) >= 32
    assert r.ensure_password() == path  # never regenerated


def test_remote_repository_never_gets_a_generated_password(tmp_path) -> None:
    r = Restic(repo(tmp_path, url="sftp:backup@host:/srv/restic"), credentials_dir="")
    with pytest.raises(RepositoryError, match="remote repository needs its password"):
        r.ensure_password()


def test_environment_file_reaches_restic_but_is_masked(tmp_path) -> None:
    env_file = tmp_path / "restic.env"
    env_file.write_text("# s3\nAWS_ACCESS_KEY_ID=AKIA123\nAWS_SECRET_ACCESS_KEY=\"topsecret\"\n")
    r = Restic(repo(tmp_path, url="s3:host/bucket", env_file=str(env_file)), credentials_dir="")
    assert r.env()["AWS_SECRET_ACCESS_KEY"] == "topsecret"
    assert "topsecret" in r.secrets()


def test_end_to_end_with_real_restic(tmp_path) -> None:
    """Init on first use, back up a tree relative to its mount point, find it by tag."""
    if not any(os.access(os.path.join(d, "restic"), os.X_OK) for d in os.environ["PATH"].split(":")):
        pytest.fail("restic is not installed; the test setup installs it")
    src = tmp_path / "mnt" / "vm1"
    src.mkdir(parents=True)
    (src / "disk.img").write_bytes(os.urandom(4096))
    r = Restic(repo(tmp_path), credentials_dir="")
    r.ensure_initialized()
    seen: list[Progress] = []
    summary = r.backup(["vm1"], tags_for("h", "vm1", "system/xenvm", "files", "r1"), "h", seen.append,
                       cwd=str(tmp_path / "mnt"))
    assert summary.files == 1 and summary.total_bytes == 4096
    (snap,) = r.snapshots(["xenbackup", "vm:vm1"], host="h")
    assert snap.id.startswith(summary.snapshot_id) and snap.tag_value("run") == "r1"
    assert r.snapshots(["vm:vm2"], host="h") == []
    assert r.snapshots(["xenbackup"]) == [], "this host (not h) has no backups"


def test_a_vanished_local_repository_is_never_recreated(write_config, tmp_path) -> None:
    from xenbackup import config
    from xenbackup.actions.backup import Context, open_repository

    url = tmp_path / "backupdisk" / "repo"
    cfg = config.load(str(write_config(f"""
        [repository]
        url = "{url}"
        password_file = "{tmp_path / 'pw'}"
        [settings]
        state_dir = "{tmp_path / 'state'}"
        runtime_dir = "{tmp_path / 'run'}"
        [vm.vm1]
        disks = [{{ lv = "system/xenvm", path = "vm1" }}]
    """)))
    ctx = Context.from_config(cfg)
    open_repository(ctx)  # first use: created
    assert (url / "config").is_file()

    (tmp_path / "backupdisk").rename(tmp_path / "unmounted")  # the disk is not mounted tonight
    with pytest.raises(RepositoryError, match="is its disk mounted"):
        open_repository(ctx)
    assert not url.exists(), "a new repository was created in place of the missing one"

    (tmp_path / "unmounted").rename(tmp_path / "backupdisk")
    open_repository(ctx)


def test_an_unreachable_remote_repository_names_restic_s_reason(tmp_path) -> None:
    r = Restic(repo(tmp_path, url="rest:http://127.0.0.1:9/"), "restic", credentials_dir="")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "pw").write_text("secret\n")
    with pytest.raises(RepositoryError, match=r"cannot be opened: .*connection refused"):
        r.ensure_initialized()
