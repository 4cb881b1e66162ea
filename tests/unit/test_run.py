from __future__ import annotations

import pytest

from xenbackup.run import CommandError, CommandNotFound, mask, mask_url, run, stream, url_secrets


def test_not_found_is_a_readable_error() -> None:
    with pytest.raises(CommandNotFound, match=r"^lvcreate-xyz not found$"):
        run(["lvcreate-xyz"])


def test_failure_carries_exit_code_and_stderr_tail() -> None:
    with pytest.raises(CommandError) as exc:
        run(["sh", "-c", "for i in $(seq 1 40); do echo line$i >&2; done; exit 3"])
    assert exc.value.returncode == 3
    assert str(exc.value) == "sh failed with exit code 3: line40"
    assert exc.value.stderr_tail.splitlines() == [f"line{i}" for i in range(21, 41)]


def test_killed_by_signal_is_named() -> None:
    with pytest.raises(CommandError, match="killed by SIGTERM"):
        run(["sh", "-c", "kill -TERM $$"])


def test_environment_is_clean_and_c_locale(monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    out = run(["env"]).stdout
    assert "LC_ALL=C" in out.splitlines()
    assert "s3cr3t" not in out and "de_DE" not in out
    assert "/usr/sbin" in next(line for line in out.splitlines() if line.startswith("PATH="))


def test_secrets_are_masked_in_log_lines() -> None:
    assert mask(["restic", "-o", "s3.key=abc123"], ["abc123"]) == "restic -o s3.key=***"


def test_commands_are_logged_at_debug(caplog) -> None:
    caplog.set_level("DEBUG", logger="xenbackup.run")
    run(["true"])
    assert "+ true" in caplog.text


def test_stream_delivers_lines_in_order() -> None:
    seen: list[str] = []
    stream(["sh", "-c", "echo a; echo b; echo err >&2"], seen.append)
    assert seen == ["a", "b"]


def test_stream_failure_raises_with_stderr() -> None:
    with pytest.raises(CommandError, match="boom"):
        stream(["sh", "-c", "echo boom >&2; exit 1"], lambda line: None)


def test_error_line_is_preferred_over_usage_hint() -> None:
    err = CommandError(["lvcreate"], 3, "  modprobe: ERROR: could not insert 'dm_snapshot': Operation not permitted\n"
                       "  /sbin/modprobe failed: 1\n  Run `lvcreate --help' for more information.\n")
    assert str(err) == ("lvcreate failed with exit code 3: modprobe: ERROR: could not insert 'dm_snapshot': "
                        "Operation not permitted")


def test_a_go_stack_trace_becomes_one_error_chain(data) -> None:
    # restic 0.14 on a read-only repository: retries, then the root cause, its stack and the wrapping message.
    err = CommandError(["restic", "backup"], 1, (data / "restic-backup-readonly-repo.stderr").read_text())
    cause = err.cause()
    assert cause.startswith("unable to create lock in backend: open /srv/backup/repo/locks/")
    assert cause.endswith(": read-only file system")
    assert ".go:" not in err.stderr_tail and "main.runBackup" not in err.stderr_tail
    assert "read-only file system" in err.stderr_tail.splitlines()[-2]


@pytest.mark.parametrize(("url", "logged", "secrets"), [
    ("rest:https://backup:hunter2@host:8000/repo/", "rest:https://backup:***@host:8000/repo/", ["hunter2"]),
    ("https://hooks.example/alert?token=s3cr3t&x=1", "https://hooks.example/alert?***", ["token=s3cr3t&x=1"]),
    ("https://TOKEN123@hooks.example/a?k=v#top", "https://***@hooks.example/a?***#top", ["TOKEN123", "k=v"]),
    ("sftp:backup@host:/srv/restic", "sftp:backup@host:/srv/restic", []),
    ("/srv/restic", "/srv/restic", []),
    ("s3:https://s3.example/bucket", "s3:https://s3.example/bucket", []),
])
def test_urls_are_logged_without_passwords_or_queries(url: str, logged: str, secrets: list[str]) -> None:
    assert mask_url(url) == logged
    assert url_secrets(url) == secrets


def test_a_secret_echoed_on_stderr_is_masked() -> None:
    with pytest.raises(CommandError) as exc:
        run(["sh", "-c", "echo 'auth failed for token s3cr3t' >&2; exit 1"], secrets=["s3cr3t"])
    assert str(exc.value) == "sh failed with exit code 1: auth failed for token ***"
    assert run(["sh", "-c", "echo s3cr3t >&2"], secrets=["s3cr3t"]).stderr == "***\n"
