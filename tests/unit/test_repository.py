from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from xenbackup import names
from xenbackup.config import RepositoryConfig
from xenbackup.model import Retention
from xenbackup.repository import (
    BackupSummary,
    Progress,
    RepositoryError,
    Restic,
    open_failure,
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
    assert f"+ {restic} cat config --no-lock" in lines
    assert "initialising restic repository rest:https://backup:***@backup.example:8000/host1/" in lines
    assert ("error: restic failed with exit code 1 on repository rest:https://backup:***@backup.example:8000/host1/: "
            "Fatal: unable to open config file: key *** rejected by "
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
    (snap,) = r.snapshots(["xenbackup", "vm:vm1"], host="h")
    assert snap.id.startswith(summary.snapshot_id) and snap.tag_value("run") == "r1"
    assert r.snapshots(["vm:vm2"], host="h") == []
    assert r.snapshots(["xenbackup"]) == [], "this host (not h) has no backups"


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
def test_fleet_options_parse_and_default(write_config) -> None:
    from xenbackup import config

    default = config.load(str(write_config("[repository]\nurl = \"/r\"\n"))).repository
    assert (default.prune, default.lock_wait, default.limit_upload, default.limit_download) == (True, 3600, 0, 0)
    for text, seconds in (('"1h"', 3600), ('"30min"', 1800), ('"1h 30min"', 5400), ("90", 90), ('"45s"', 45),
                          ('"0"', 0), ('"2d"', 172800)):
        cfg = config.load(str(write_config(f'[repository]\nlock_wait = {text}\n'))).repository
        assert cfg.lock_wait == seconds, text
    cfg = config.load(str(write_config("[repository]\nprune = false\nlimit_upload = 2048\nlimit_download = 512\n")))
    assert (cfg.repository.prune, cfg.repository.limit_upload, cfg.repository.limit_download) == (False, 2048, 512)


def test_bad_fleet_options_are_all_reported(write_config) -> None:
    from xenbackup import config

    path = write_config("""
        [repository]
        prune = "yes"
        lock_wait = "soon"
        limit_upload = "fast"
        limit_download = -1
    """)
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(path))
    text = "\n".join(exc.value.errors)
    assert f"{path}: repository.prune: expected true or false" in text
    assert f'{path}: repository.lock_wait: expected seconds or a time span such as "1h" or "30min", got \'soon\'' \
        in text
    assert f"{path}: repository.limit_upload: expected an integer" in text
    assert f"{path}: repository.limit_download: expected 0..10000000, got -1" in text
    with pytest.raises(config.ConfigError, match=r"lock_wait: expected 0\.\.604800 seconds"):
        config.load(str(write_config('[repository]\nlock_wait = "8d"\n')))
    with pytest.raises(config.ConfigError, match="lock_wait: expected seconds"):
        config.load(str(write_config('[repository]\nlock_wait = "1 fortnight"\n')))


def _recording_restic(tmp_path) -> tuple[str, object]:
    """A restic that records its argv and environment, one JSON line per call."""
    calls = tmp_path / "restic-calls.jsonl"
    fake = tmp_path / "fake-restic"
    fake.write_text(f"""#!/usr/bin/env python3
import json, os, sys
with open("{calls}", "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ)}}) + "\\n")
if "snapshots" in sys.argv:
    print("[]")
if "version" in sys.argv:
    print("restic 0.14.0 compiled with go1.19.8 on linux/amd64")
if "fail" in os.environ.get("RESTIC_REPOSITORY", ""):
    print("Fatal: s3 said: bad key " + os.environ.get("AWS_SECRET_ACCESS_KEY", ""), file=sys.stderr)
    sys.exit(1)
""")
    fake.chmod(0o755)

    def read() -> list[dict[str, object]]:
        return [json.loads(line) for line in calls.read_text().splitlines()]
    return str(fake), read


def test_bandwidth_limits_reach_every_repository_command(tmp_path) -> None:
    from dataclasses import replace

    fake, calls = _recording_restic(tmp_path)
    cfg = replace(repo(tmp_path, url="sftp:backup@nas:/srv/restic"), limit_upload=2048, limit_download=512)
    r = Restic(cfg, fake, credentials_dir="")
    r.snapshots(["xenbackup"])
    r.check()
    r.forget(["abc"])
    r.prune()
    r.restore("abc", str(tmp_path / "t"))
    r.dump("abc", "/x.img", lambda b: None)
    r.run_argv(r.forget_policy_argv(["xenbackup"], "h", Retention(keep_last=1)))
    r.is_initialized()
    repo_calls = [c["argv"] for c in calls() if c["argv"] != ["version"]]  # type: ignore[index]
    assert len(repo_calls) == 8
    for argv in repo_calls:
        assert argv[:4] == ["--limit-upload", "2048", "--limit-download", "512"], argv
    built = r.backup_argv(["vm1"], ["xenbackup"], "h")
    assert built[:5] == [fake, "--limit-upload", "2048", "--limit-download", "512"]
    unlimited = Restic(repo(tmp_path), fake, credentials_dir="")
    assert "--limit-upload" not in unlimited.backup_argv(["vm1"], ["xenbackup"], "h")


def test_s3_keys_reach_only_restic_s_environment_and_never_argv_or_logs(tmp_path, caplog) -> None:
    import logging

    from xenbackup.run import CommandError, run

    env_file = tmp_path / "restic.env"
    env_file.write_text("AWS_ACCESS_KEY_ID=AKIAFILE\nAWS_SECRET_ACCESS_KEY=file-secret-123\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "restic-password").write_text("the-repository-password\n")
    (creds / "restic-environment").write_text("AWS_SECRET_ACCESS_KEY=credential-secret-456\n")
    fake, calls = _recording_restic(tmp_path)
    caplog.set_level(logging.DEBUG)
    r = Restic(repo(tmp_path, url="s3:http://127.0.0.1:7480/bucket", env_file=str(env_file)), fake,
               credentials_dir=str(creds))
    r.snapshots(["xenbackup"])
    (call,) = [c for c in calls() if c["argv"] != ["version"]]
    secrets = ("credential-secret-456", "file-secret-123", "the-repository-password")
    assert not any(s in " ".join(call["argv"]) for s in secrets)  # type: ignore[arg-type]
    env = call["env"]
    # The systemd credential wins over the file; the password travels as a file name, not a value.
    assert env["AWS_SECRET_ACCESS_KEY"] == "credential-secret-456"  # type: ignore[index]
    assert env["AWS_ACCESS_KEY_ID"] == "AKIAFILE"  # type: ignore[index]
    assert env["RESTIC_PASSWORD_FILE"] == str(creds / "restic-password")  # type: ignore[index]
    assert "the-repository-password" not in json.dumps(env)

    # restic repeating a secret in its error: the error xenbackup logs is masked.
    failing = Restic(repo(tmp_path, url="s3:http://fail/bucket", env_file=str(env_file)), fake,
                     credentials_dir=str(creds))
    with pytest.raises(CommandError) as exc:
        failing.check()
    assert "credential-secret-456" not in str(exc.value) and "***" in str(exc.value)
    assert "credential-secret-456" not in exc.value.stderr_tail
    assert not any("credential-secret-456" in rec.getMessage() for rec in caplog.records)

    # Any other child xenbackup starts (a notify command, lvcreate) gets none of restic's environment.
    other = run(["env"]).stdout
    assert "AWS_" not in other and "RESTIC_" not in other


def test_a_password_in_the_repository_url_is_masked_in_messages(tmp_path) -> None:
    cfg = repo(tmp_path, url="rest:https://backup:url-pass-789@nas:8000/xen")
    assert cfg.display_url == "rest:https://backup:***@nas:8000/xen"
    assert "url-pass-789" in Restic(cfg, credentials_dir="").secrets()
    assert repo(tmp_path, url="s3:http://127.0.0.1:7480/b").display_url == "s3:http://127.0.0.1:7480/b"


def test_sftp_key_and_known_hosts_become_restic_s_ssh_command(write_config, tmp_path) -> None:
    from xenbackup import config
    from xenbackup.repository import sftp_command

    cfg = config.load(str(write_config("""
        [repository]
        url = "sftp:backup@nas.example:/srv/restic"
        sftp_identity = "/etc/xenbackup/id_ed25519"
        sftp_known_hosts = "/etc/xenbackup/known_hosts"
        sftp_options = ["ConnectTimeout=30", "ServerAliveInterval=60"]
    """))).repository
    r = Restic(cfg, credentials_dir="")
    argv = r.backup_argv(["vm1"], ["xenbackup"], "h")
    assert argv[1:3] == ["-o", "sftp.command=ssh -o BatchMode=yes -i /etc/xenbackup/id_ed25519 -o IdentitiesOnly=yes "
                         "-o UserKnownHostsFile=/etc/xenbackup/known_hosts -o StrictHostKeyChecking=yes "
                         "-o ConnectTimeout=30 -o ServerAliveInterval=60 backup@nas.example -s sftp"]
    url_form = config.load(str(write_config("""
        [repository]
        url = "sftp://backup@nas.example:2222//srv/restic"
        sftp_known_hosts = "/etc/xenbackup/known_hosts"
    """))).repository
    assert sftp_command(url_form) == ("ssh -o BatchMode=yes -o UserKnownHostsFile=/etc/xenbackup/known_hosts "
                                      "-o StrictHostKeyChecking=yes -p 2222 backup@nas.example -s sftp")
    plain = config.load(str(write_config('[repository]\nurl = "sftp:nas:/srv/restic"\n'))).repository
    assert sftp_command(plain) is None and "-o" not in Restic(plain, credentials_dir="").global_args()


def test_bad_sftp_options_are_reported(write_config) -> None:
    from xenbackup import config

    path = write_config("""
        [repository]
        url = "/srv/restic"
        sftp_identity = "/etc/xenbackup/my key"
        sftp_options = ["ProxyCommand=nc %h 22", "-v"]
    """)
    with pytest.raises(config.ConfigError) as exc:
        config.load(str(path))
    text = "\n".join(exc.value.errors)
    assert "repository.sftp_identity: '/etc/xenbackup/my key': restic passes this path to ssh unquoted" in text
    assert "repository.sftp_options: bad ssh option 'ProxyCommand=nc %h 22'" in text
    path = write_config('[repository]\nurl = "/srv/restic"\nsftp_known_hosts = "/etc/xenbackup/known_hosts"\n')
    with pytest.raises(config.ConfigError, match=r"repository\.sftp_known_hosts: applies to sftp: repositories only"):
        config.load(str(path))


def sftp_repository(tmp_path, monkeypatch, ssh_body: str, **sftp: str) -> Restic:
    """A real restic for sftp:backup@nas.example:/srv/restic whose ssh on PATH is the shell script ssh_body."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(f"#!/bin/sh\n{ssh_body}")
    (bindir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    (tmp_path / "pw").write_text("pw\n")
    cfg = RepositoryConfig(url="sftp:backup@nas.example:/srv/restic", password_file=str(tmp_path / "pw"),
                           environment_file=None, cache_dir=str(tmp_path / "c"), host="h", compression="auto",
                           **sftp)
    return Restic(cfg, "restic", credentials_dir="")


def test_real_restic_runs_ssh_with_exactly_these_arguments(tmp_path, monkeypatch) -> None:
    """restic 0.14 splits sftp.command itself; an ssh on PATH records what it was given."""
    # It lingers after its verdict: restic forwards ssh's stderr from a goroutine of its own, and an ssh gone
    # at once can beat it to restic's Fatal exit, which then says only "file already closed" (seen under load).
    restic = sftp_repository(tmp_path, monkeypatch,
                             f'for a in "$@"; do echo "$a"; done > {tmp_path / "ssh.argv"}\n'
                             'echo "Host key verification failed." >&2\nsleep 0.5\nexit 255\n',
                             sftp_identity="/etc/xenbackup/id_ed25519", sftp_known_hosts="/etc/xenbackup/known_hosts")
    with pytest.raises(RepositoryError, match=r"cannot be opened: .*Host key verification failed"):
        restic.ensure_initialized()
    assert (tmp_path / "ssh.argv").read_text().splitlines() == [
        "-o", "BatchMode=yes", "-i", "/etc/xenbackup/id_ed25519", "-o", "IdentitiesOnly=yes",
        "-o", "UserKnownHostsFile=/etc/xenbackup/known_hosts", "-o", "StrictHostKeyChecking=yes",
        "backup@nas.example", "-s", "sftp"]


def test_when_restic_loses_ssh_s_verdict_ssh_is_asked_once_more(tmp_path, monkeypatch) -> None:
    """restic's Fatal exit can beat its goroutine that forwards ssh's stderr; then it says only "EOF"."""
    # The first ssh (restic's) dies silently, as when restic drops its words; the second (ours) says why.
    calls = tmp_path / "ssh.calls"
    restic = sftp_repository(tmp_path, monkeypatch,
                             f'echo "$*" >> {calls}\n[ "$(wc -l < {calls})" -ge 2 ] || exit 255\n'
                             'echo "Host key verification failed." >&2\nexit 255\n',
                             sftp_known_hosts="/etc/xenbackup/known_hosts")
    with pytest.raises(RepositoryError) as exc:
        restic.ensure_initialized()
    assert "cannot be opened: ssh: Host key verification failed.; Fatal: unable to open repository" in str(exc.value)
    restics, ours = calls.read_text().splitlines()
    assert ours == restics == ("-o BatchMode=yes -o UserKnownHostsFile=/etc/xenbackup/known_hosts "
                               "-o StrictHostKeyChecking=yes backup@nas.example -s sftp")


def test_an_sftp_failure_restic_explained_asks_ssh_nothing(tmp_path, monkeypatch) -> None:
    calls = tmp_path / "ssh.calls"
    restic = sftp_repository(tmp_path, monkeypatch,
                             f'echo "$*" >> {calls}\necho "Permission denied (publickey)." >&2\nsleep 0.5\n'
                             'exit 255\n')
    with pytest.raises(RepositoryError, match=r"cannot be opened: subprocess ssh: Permission denied \(publickey\)"):
        restic.ensure_initialized()
    assert len(calls.read_text().splitlines()) == 1


# restic 0.14 opening sftp:backup@localhost:/srv/restic with a known_hosts that pins another key.
SFTP_WRONG_KEY = """\
subprocess ssh: @@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @
@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@
subprocess ssh: Host key for localhost has changed and you have requested strict checking.
subprocess ssh: Host key verification failed.
Fatal: unable to open repository at sftp:backup@localhost:/srv/restic: unable to start the sftp session, error: EOF
"""


def test_an_sftp_open_failure_says_what_ssh_said_and_what_restic_did() -> None:
    why = open_failure(SFTP_WRONG_KEY, sftp=True)
    assert why.startswith("subprocess ssh: Host key verification failed.; Fatal: unable to open repository")


def test_other_open_failures_give_restic_s_fatal_line() -> None:
    stderr = "Load(<config/0000000000>, 0, 0) returned error, retrying after 552ms: connection refused\n" \
             "Fatal: unable to open config file: Stat: connection refused\n"
    assert open_failure(stderr) == "Fatal: unable to open config file: Stat: connection refused"
    assert open_failure("wrong password or no key found\n") == "wrong password or no key found"
    assert open_failure("") == "no answer"


def _segmented_backup(tmp_path, logging_restic) -> tuple[Restic, str, list[str], list[bytes], Path]:
    """A real repository holding a directory of three segment files (the last one short), as a
    block-mode run of a thin LV stores them, opened through a restic that logs each call."""
    wrapper, calls = logging_restic
    segdir = tmp_path / "mnt" / "thinvg-blk"
    segdir.mkdir(parents=True)
    contents = [os.urandom(70_000), os.urandom(70_000), os.urandom(1_234)]
    for index, data in enumerate(contents):
        (segdir / names.segment_file(index)).write_bytes(data)
    r = Restic(repo(tmp_path), str(wrapper), credentials_dir="")
    r.ensure_initialized()
    summary = r.backup([str(segdir)], ["xenbackup"], "h", lambda p: None)
    files = [str(segdir / names.segment_file(i)) for i in range(len(contents))]
    calls.write_text("")
    return r, summary.snapshot_id, files, contents, calls


def test_a_segmented_image_comes_back_in_order_from_one_restic_dump(tmp_path, logging_restic) -> None:
    r, snap, files, contents, calls = _segmented_backup(tmp_path, logging_restic)
    out = bytearray()
    sizes: list[tuple[str, int]] = []
    r.dump_in_order(snap, files, out.extend, lambda name, size: sizes.append((name, size)))
    assert bytes(out) == b"".join(contents)
    assert sizes == [(name, len(data)) for name, data in zip(files, contents, strict=True)]
    # One repository open for the whole image, not one per segment.
    dumps = [line for line in calls.read_text().splitlines() if " dump " in f" {line} "]
    assert len(dumps) == 1 and dumps[0].endswith(f"dump {snap} {os.path.dirname(files[0])}"), dumps


def test_a_segment_missing_from_or_added_to_the_dump_fails_the_restore(tmp_path, logging_restic) -> None:
    r, snap, files, _, _ = _segmented_backup(tmp_path, logging_restic)
    with pytest.raises(RepositoryError, match=r"holds .*seg-00000001 where .*seg-00000002 was expected"):
        r.dump_in_order(snap, [files[0], files[2]], lambda data: None)
    with pytest.raises(RepositoryError, match=r"ended before .*seg-00000003"):
        r.dump_in_order(snap, [*files, os.path.join(os.path.dirname(files[0]), names.segment_file(3))],
                        lambda data: None)
