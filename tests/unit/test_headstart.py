"""The backup step's head start against real processes: the runner takes the process started ahead only if it
runs exactly the command asked for, stops it otherwise, and no secret is written down on the way."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from xenbackup import headstart
from xenbackup.run import Rehearsed, clean_env, rehearsal, run, stop_head_start, stream

INVOCATION = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def unit(tmp_path: Path) -> dict[str, str]:
    """The environment systemd gives the steps of one invocation."""
    runtime = tmp_path / "run"
    runtime.mkdir()
    return {"INVOCATION_ID": INVOCATION, "RUNTIME_DIRECTORY": str(runtime)}


@pytest.fixture
def tool(tmp_path: Path) -> Path:
    """A command that notes each start with its working directory, stdin and secret, and a SIGTERM. It prints
    two lines; its first start waits to be told to go on (a file appears) first."""
    script = tmp_path / "tool"
    script.write_text(f"""#!/bin/sh
log={tmp_path / 'starts'}
echo "start $$ $(pwd) $(head -c 5) ${{SECRET:-none}}" >> "$log"
trap 'echo "term $$" >> "$log"; exit 143' TERM
[ "$(grep -c '^start' "$log")" -gt 1 ] || for i in $(seq 200); do [ -e {tmp_path / 'go'} ] \\
    && break; sleep 0.05; done
echo one
echo two
""")
    script.chmod(0o755)
    (tmp_path / "input").write_bytes(b"bytes from the device")
    return script


def starts(tmp_path: Path) -> list[str]:
    path = tmp_path / "starts"
    return path.read_text().splitlines() if path.exists() else []


def wait_for_start(tmp_path: Path, count: int = 1) -> None:
    deadline = time.monotonic() + 30
    while len([line for line in starts(tmp_path) if line.startswith("start")]) < count:
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.05)


def leave(tmp_path: Path, tool: Path, unit: dict[str, str], env: dict[str, str], files: list[str]) -> list[str]:
    argv = [str(tool), "backup", "--json"]
    headstart.leave(headstart.BACKUP, "web1", argv, env, str(tmp_path), str(tmp_path / "input"), files, unit)
    return argv


def test_the_process_started_ahead_is_the_one_the_runner_runs(tmp_path: Path, tool: Path,
                                                              unit: dict[str, str]) -> None:
    secret_file = tmp_path / "s3.env"
    secret_file.write_text("SECRET=hunter22\n")
    env = clean_env({"RESTIC_REPOSITORY": "s3:http://gw/bucket"})
    argv = leave(tmp_path, tool, unit, env, [str(secret_file)])
    plan = Path(unit["RUNTIME_DIRECTORY"]) / ".headstart" / INVOCATION
    assert plan.stat().st_mode & 0o777 == 0o600
    assert b"hunter22" not in plan.read_bytes()

    started = headstart.start(["step", "backup", "web1"], unit)
    assert started is not None and not plan.exists(), "the command is taken once"
    wait_for_start(tmp_path)
    lines: list[str] = []
    (tmp_path / "go").touch()
    with open(tmp_path / "input", "rb") as stdin:
        done = stream(argv, lines.append, env={"RESTIC_REPOSITORY": "s3:http://gw/bucket", "SECRET": "hunter22"},
                      cwd=str(tmp_path), stdin=stdin)
    assert lines == ["one", "two"] and done.returncode == 0
    # One start: the runner read the head start's pipes, in its directory, from its stdin, with the secret
    # read again from its file.
    assert starts(tmp_path) == [f"start {started.pid} {tmp_path} bytes hunter22"]


@pytest.mark.parametrize("differs", ["argv", "env", "cwd", "stdin"])
def test_a_process_started_ahead_for_another_command_is_stopped(tmp_path: Path, tool: Path,
                                                                unit: dict[str, str], differs: str) -> None:
    env = clean_env({"RESTIC_REPOSITORY": "/srv/repo"})
    argv = leave(tmp_path, tool, unit, env, [])
    started = headstart.start(["step", "backup", "web1"], unit)
    assert started is not None
    wait_for_start(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "input").write_bytes(b"other")
    lines: list[str] = []
    with open((other if differs == "stdin" else tmp_path) / "input", "rb") as stdin:
        stream([*argv, "--extra"] if differs == "argv" else argv, lines.append,
               env={"RESTIC_REPOSITORY": "/srv/other" if differs == "env" else "/srv/repo"},
               cwd=str(other if differs == "cwd" else tmp_path), stdin=stdin)
    seen = starts(tmp_path)
    assert seen[:2] == [f"start {started.pid} {tmp_path} bytes none", f"term {started.pid}"], seen
    assert len(seen) == 3 and seen[2].startswith("start ") and lines == ["one", "two"]


def test_a_head_start_no_one_takes_is_stopped(tmp_path: Path, tool: Path, unit: dict[str, str]) -> None:
    leave(tmp_path, tool, unit, clean_env({}), [])
    started = headstart.start(["step", "backup", "web1"], unit)
    assert started is not None
    wait_for_start(tmp_path)
    stop_head_start()
    assert starts(tmp_path)[-1] == f"term {started.pid}"
    with pytest.raises(ChildProcessError):
        os.waitpid(started.pid, os.WNOHANG)  # reaped, not left a zombie


@pytest.mark.parametrize(("argv", "vm", "environ"), [
    (["step", "backup", "web2"], "web1", {}),                       # another VM's command
    (["step", "cleanup", "web1"], "web1", {}),
    (["--debug", "step", "backup", "web1"], "web1", {}),            # not the unit's own command line
    (["step", "backup", "web1"], "web1", {"INVOCATION_ID": "f" * 32}),  # another invocation's
    (["step", "backup", "web1"], "web1", {"RUNTIME_DIRECTORY": ""}),     # not in a unit
])
def test_only_the_same_invocation_s_backup_step_starts_it(tmp_path: Path, tool: Path, unit: dict[str, str],
                                                          argv: list[str], vm: str,
                                                          environ: dict[str, str]) -> None:
    headstart.leave(headstart.BACKUP, vm, [str(tool)], clean_env({}), None, None, [], unit)
    assert headstart.start(argv, {**unit, **environ}) is None
    assert headstart.take() is None and starts(tmp_path) == []


def test_a_damaged_plan_a_missing_secret_file_or_directory_means_no_head_start(tmp_path: Path, tool: Path,
                                                                     unit: dict[str, str]) -> None:
    leave(tmp_path, tool, unit, clean_env({}), [str(tmp_path / "gone.env")])
    assert headstart.start(["step", "backup", "web1"], unit) is None
    plan = Path(unit["RUNTIME_DIRECTORY"]) / ".headstart" / INVOCATION
    plan.write_bytes(b"\x00garbage")
    assert headstart.start(["step", "backup", "web1"], unit) is None
    headstart.leave(headstart.BACKUP, "web1", [str(tool)], clean_env({}), str(tmp_path / "unmounted"), None, [],
                    unit)
    here = os.getcwd()
    assert headstart.start(["step", "backup", "web1"], unit) is None and os.getcwd() == here
    assert starts(tmp_path) == [] and headstart.take() is None


def test_a_rehearsal_starts_nothing_and_tells_what_would_have_run(tmp_path: Path, tool: Path) -> None:
    with open(tmp_path / "input", "rb") as stdin, pytest.raises(Rehearsed) as seen, rehearsal():
        stream([str(tool), "x"], print, env={"K": "v"}, secrets=["v"], cwd=str(tmp_path), stdin=stdin)
    assert seen.value.argv == [str(tool), "x"] and seen.value.env == clean_env({"K": "v"})
    assert (seen.value.cwd, seen.value.stdin, seen.value.secrets) == (str(tmp_path), str(tmp_path / "input"),
                                                                      ["v"])
    assert starts(tmp_path) == []
    lines: list[str] = []
    (tmp_path / "go").touch()
    stream([str(tool)], lines.append)  # outside the rehearsal, commands run again
    assert lines == ["one", "two"]


def test_the_key_check_left_for_the_next_run_is_taken_by_its_command_only(tmp_path: Path, tool: Path,
                                                                          unit: dict[str, str]) -> None:
    """The prepare step runs LVM's commands while the key check runs: only the key check's own command takes
    the process, from whichever thread; the next run of the VM, another invocation, finds it."""
    import threading

    argv = [str(tool), "cat", "config", "--no-lock"]
    headstart.leave(headstart.PREPARE, "web1", argv, clean_env({"RESTIC_REPOSITORY": "/srv/repo"}), None, None,
                    [], unit)
    runtime = unit["RUNTIME_DIRECTORY"]
    assert headstart.plan_path(headstart.PREPARE, "web1", unit) == f"{runtime}/.headstart/web1.prepare"
    next_run = {**unit, "INVOCATION_ID": "f" * 32}
    started = headstart.start(["step", "prepare", "web1"], next_run)
    assert started is not None
    wait_for_start(tmp_path)
    assert run(["sh", "-c", "echo lvs"]).stdout == "lvs\n"   # another command: the head start stays
    (tmp_path / "go").touch()
    got: list[str] = []
    thread = threading.Thread(target=lambda: got.append(run(argv, env={"RESTIC_REPOSITORY": "/srv/repo"}).stdout))
    thread.start()
    thread.join(30)
    # One start, in this directory, reading /dev/null, as subprocess would have started it.
    assert got == ["one\ntwo\n"] and starts(tmp_path) == [f"start {started.pid} {os.getcwd()}  none"]


def test_a_key_check_that_no_longer_matches_is_stopped_when_the_step_ends(tmp_path: Path, tool: Path,
                                                                         unit: dict[str, str],
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    argv = [str(tool), "cat", "config", "--no-lock"]
    headstart.leave(headstart.PREPARE, "web1", argv, clean_env({"RESTIC_REPOSITORY": "/srv/old"}), None, None,
                    [], unit)
    started = headstart.start(["step", "prepare", "web1"], unit)
    assert started is not None
    wait_for_start(tmp_path)
    (tmp_path / "go").touch()
    # The config names another repository now: the step runs its own key check; the old one is left alone.
    assert run(argv, env={"RESTIC_REPOSITORY": "/srv/new"}).stdout == "one\ntwo\n"
    caplog.set_level("INFO")
    stop_head_start()
    assert [r.levelname for r in caplog.records] == ["INFO"] and "did not use it" in caplog.records[0].message
    assert len(starts(tmp_path)) >= 2 and headstart.take() is None


@pytest.mark.parametrize("vm", ["", ".finished", "../etc", "a/b"])
def test_a_vm_name_that_is_no_file_name_gets_no_key_check_file(unit: dict[str, str], vm: str) -> None:
    assert headstart.plan_path(headstart.PREPARE, vm, unit) is None
