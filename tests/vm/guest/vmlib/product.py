"""Helpers for product tests in the guest: running the product, reading the journal, finding leftovers."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmlib.cmd import processes_matching, sha256_file, tree_hashes  # noqa: F401 - re-exported for the tests

CONFIG = Path("/etc/xenbackup/xenbackup.toml")
REPO = Path("/var/lib/xenbackup/repo")
PASSWORD = Path("/etc/xenbackup/restic-password")
STATE_DIR = Path("/var/lib/xenbackup/state")
STATE = (REPO, STATE_DIR, CONFIG, PASSWORD)
"""What a test's product state is: repository, run records, config and repository password."""


def sh(*argv: str, check: bool = True, timeout: float = 600, **kw: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload]
    if check and out.returncode != 0:
        raise AssertionError(f"{argv} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


TCG_MAX_PAUSE = 60
"""max_pause for a run that must pause a two-disk guest and succeed. The default (10 s) is meant for real
hardware, where an lvcreate takes well under a second. Under TCG one took 1.5-5 s (nested, in the kvm
suite, about 5 s): windows of 2.9-10.7 s were measured, and on a loaded host one was cut short at 10 s.
Only the tests of max_pause itself go lower."""

SLOW_UPLOAD = "[repository]\nlimit_upload = 512\n"
"""A config section that keeps a run's restic busy with `ballast` for about 30 s, whatever the machine's speed,
without the minutes that hundreds of MiB of data cost under TCG (to generate, read, hash and back up again)."""


def ballast(directory: Path, mib: int = 16, name: str = "ballast.img") -> Path:
    """Incompressible data that restic must upload: with SLOW_UPLOAD, about 2 s per MiB."""
    path = directory / name
    sh("dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={mib}", "status=none")
    return path


def our_snapshots() -> list[str]:
    out = sh("lvs", "--noheadings", "-o", "lv_full_name", "@xenbackup").stdout.split()
    return out


def our_mounts() -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith("/run/xenbackup/")]


class Journal:
    """Read the journal from a cursor taken before the action under test."""

    def __init__(self) -> None:
        out = sh("journalctl", "-n", "0", "--show-cursor", "--no-pager").stdout
        self.cursor = out.strip().split("cursor: ", 1)[-1]

    def entries(self, *matches: str) -> list[dict[str, object]]:
        sh("journalctl", "--sync", check=False)
        out = sh("journalctl", "--no-pager", "-o", "json", "--after-cursor", self.cursor, *matches).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def text(self, *matches: str) -> str:
        sh("journalctl", "--sync", check=False)
        return sh("journalctl", "--no-pager", "--after-cursor", self.cursor, *matches).stdout


@dataclass
class Xb:
    vm: str = "vm1"

    def write_config(self, text: str) -> None:
        CONFIG.parent.mkdir(parents=True, exist_ok=True)
        CONFIG.write_text(textwrap.dedent(text))

    def start(self, vm: str | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
        return sh("systemctl", "start", f"xenbackup@{vm or self.vm}.service", check=check, timeout=900)

    def restic(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "RESTIC_REPOSITORY": str(REPO), "RESTIC_PASSWORD_FILE": str(PASSWORD)}
        return sh("restic", *args, env=env)

    def snapshots(self, *tags: str) -> list[dict[str, object]]:
        if not (REPO / "config").exists():
            return []
        args = ["snapshots", "--json"] + (["--tag", ",".join(tags)] if tags else [])
        return json.loads(self.restic(*args).stdout or "[]")

    def wait_for_restic(self, journal: Journal, timeout: float = 300) -> None:
        """Wait until the started unit's `restic backup` runs; fail at once if the unit ends before that.

        Only a disk's backup counts: the snapshot step runs restic too before any snapshot exists, as the key
        check (`cat config`) or, for a VM whose domain config no disk's run can carry, as the `restic backup`
        of that config (tag disk:config)."""
        unit = f"xenbackup@{self.vm}.service"
        deadline = time.monotonic() + timeout
        polls = 0
        while not [line for _, line in processes_matching("(^|/)restic .*backup --json") if "disk:config" not in line]:
            assert time.monotonic() < deadline, "restic never started"
            # The unit's state once a second: each systemctl costs a share of the one vCPU the run needs.
            if polls % 10 == 0:
                state = sh("systemctl", "is-active", unit, check=False).stdout.strip()
                assert state in ("activating", "active"), journal.text("-u", unit)
            polls += 1
            time.sleep(0.1)

    def wait_inactive(self, vm: str | None = None, timeout: float = 300) -> str:
        unit = f"xenbackup@{vm or self.vm}.service"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = sh("systemctl", "show", "-p", "ActiveState", "--value", unit).stdout.strip()
            if state in ("inactive", "failed"):
                return state
            time.sleep(0.5)
        raise AssertionError(f"{unit} still {state} after {timeout} s")


GENERATED = Path("/run/systemd/generator")
"""Where systemd has xenbackup-generator write the timers of scheduled VMs."""


def scheduled_units() -> list[Path]:
    """What the generator or a test left for systemd: timers that only a daemon-reload takes away."""
    return [*GENERATED.glob("xenbackup@*.timer.d"), *GENERATED.glob("timers.target.wants/xenbackup@*"),
            *Path("/run/systemd/system").glob("xenbackup@*.timer.d")]


def remove_state(*more: str) -> None:
    """Remove the product's state (STATE) and `more` paths, in one rm."""
    sh("rm", "-rf", *(str(path) for path in STATE), *more)


def fresh_product() -> Iterator[Xb]:
    """A clean product state: no repository, no config, no run records; reset afterwards too.

    daemon-reload takes 5-20 s under TCG, so it runs only when a schedule was generated."""
    def reset() -> None:
        # One systemctl per verb: each start of it costs a few tenths of a second under TCG, and it goes on
        # to the next unit when one is not loaded.
        units = ("xenbackup@vm1.service", "xenbackup@vm1.timer")
        sh("systemctl", "stop", *units, check=False)
        sh("systemctl", "reset-failed", *units, check=False)
        reload = bool(scheduled_units())
        remove_state("/run/systemd/system/xenbackup@vm1.timer.d")
        if reload:
            sh("systemctl", "daemon-reload")
            assert not scheduled_units(), scheduled_units()
    reset()
    yield Xb()
    reset()


MSG_STARTED = "f29c5be40ab94b71bc936a45de01b458"
MSG_SUCCEEDED = "14a99ce9301e4006b02b2ce251777ef6"
MSG_FAILED = "5b23e4b2994d43d79583bc826a29e2f8"
MSG_STALE = "d219b7ba720d4e6b8d7b2a49544fedaf"
MSG_OVERFLOW = "082d819371eb498e80e6253e19c6058c"
MSG_EXTENDED = "728c0e799eb9423badef1d4434a899eb"
