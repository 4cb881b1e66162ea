from __future__ import annotations

import json
import os
import stat

import pytest

from xenbackup import names
from xenbackup.config import RepositoryConfig
from xenbackup.repository import (
    BackupSummary,
    Progress,
    RepositoryError,
    Restic,
    parse_progress,
    parse_snapshots,
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
    tags = names.restic_tags("h", "vm1", "system/xenvm", "files", "r1")
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


# A restic that cannot open the repository and, like some backends' errors, repeats what it was given.
ECHOING_RESTIC = """#!/bin/sh
echo "+ restic was called as: $*" >&2
echo "Fatal: unable to open config file: key $AWS_SECRET_ACCESS_KEY rejected by $RESTIC_REPOSITORY" >&2
exit 1
"""


def test_secrets_never_reach_the_log_lines_written(write_config, tmp_path, capsys) -> None:
    from xenbackup import cli

    restic = tmp_path / "restic"
    restic.write_text(ECHOING_RESTIC)
    restic.chmod(0o755)
    env_file = tmp_path / "restic.env"
    env_file.write_text("AWS_SECRET_ACCESS_KEY=topsecret\n")
    (tmp_path / "pw").write_text("pw\n")
    path = write_config(f"""
        [repository]
        url = "rest:https://backup:hunter2@backup.example:8000/host1/"
        password_file = "{tmp_path / 'pw'}"
        environment_file = "{env_file}"
        [settings]
        state_dir = "{tmp_path / 'state'}"
        runtime_dir = "{tmp_path / 'run'}"
        [commands]
        restic = "{restic}"
        [vm.vm1]
        disks = [{{ lv = "system/xenvm", path = "vm1" }}]
    """)
    assert cli.main(["--config", str(path), "--debug", "init"]) == cli.EXIT_FAILED
    lines = capsys.readouterr().err.splitlines()
    assert f"+ {restic} cat config" in lines
    assert "initialising restic repository rest:https://backup:***@backup.example:8000/host1/" in lines
    assert ("error: restic failed with exit code 1: Fatal: unable to open config file: key *** rejected by "
            "rest:https://backup:***@backup.example:8000/host1/") in lines
    assert not [line for line in lines if "hunter2" in line or "topsecret" in line]


def test_restic_s_complaint_is_masked_where_it_is_kept(tmp_path) -> None:
    from xenbackup.run import CommandError

    restic = tmp_path / "restic"
    restic.write_text(ECHOING_RESTIC)
    restic.chmod(0o755)
    env_file = tmp_path / "restic.env"
    env_file.write_text("AWS_SECRET_ACCESS_KEY=topsecret\n")
    r = Restic(repo(tmp_path, url="rest:https://backup:hunter2@backup.example/", env_file=str(env_file)), str(restic),
               credentials_dir="")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "pw").write_text("pw\n")
    with pytest.raises(CommandError) as exc:
        r.init()
    assert exc.value.stderr_tail.splitlines()[-1] == ("Fatal: unable to open config file: key *** rejected by "
                                                      "rest:https://backup:***@backup.example/")
    assert "hunter2" not in str(exc.value) and "topsecret" not in str(exc.value)


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
    summary = r.backup(["vm1"], names.restic_tags("h", "vm1", "system/xenvm", "files", "r1"), "h", seen.append,
                       cwd=str(tmp_path / "mnt"))
    assert summary.files == 1 and summary.total_bytes == 4096
    (snap,) = r.snapshots(["xenbackup", "vm:vm1"])
    assert snap.id.startswith(summary.snapshot_id) and snap.tag_value("run") == "r1"
    assert r.snapshots(["vm:vm2"]) == []


def test_a_vanished_local_repository_is_never_recreated(write_config, tmp_path) -> None:
    from xenbackup import config
    from xenbackup.actions.backup import open_repository
    from xenbackup.actions.context import Context

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


def test_the_world_readable_list_of_repositories_holds_no_password(tmp_path) -> None:
    from xenbackup.state import StateStore

    store = StateStore(str(tmp_path / "run"), str(tmp_path / "state"))
    store.remember_repository("rest:https://backup:hunter2@backup.example/")
    store.remember_repository(str(tmp_path / "repo"))
    text = (tmp_path / "state" / "repositories.json").read_text()
    assert "hunter2" not in text
    assert store.known_repositories() == ["rest:https://backup:***@backup.example/", str(tmp_path / "repo")]
