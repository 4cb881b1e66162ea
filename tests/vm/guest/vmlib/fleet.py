"""Several "hosts" on one guest: each a config file with its own `host =`, VM, LV, state and unit drop-in.

The CLI's --config (and XENBACKUP_CONFIG in a unit drop-in) stands in for separate machines; what they share
is what a real fleet shares: the repository and its password.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vmlib.cmd import processes_matching, run, sha256_file
from vmlib.product import Journal
from vmlib.storage import clear_disk, create_volume_group, remove_volume_group, wait_for_disks

VG = "fleet"
VM_SIZE_MIB = 16
FLEET_DIR = Path("/etc/xenbackup/fleet")
PASSWORD = FLEET_DIR / "restic-password"
S3_ENV = FLEET_DIR / "s3.env"
UNIT_DIR = Path("/run/systemd/system")


@dataclass(frozen=True)
class FleetVms:
    """One LV per VM name in VG `fleet`, with its sha256 as written."""

    sha256: dict[str, str]

    def device(self, vm: str) -> Path:
        return Path(f"/dev/{VG}/{vm}")


@contextmanager
def fleet_volume_group(disk: Path, vms: tuple[str, ...] = tuple(f"vm{i}" for i in range(1, 9))) -> Iterator[FleetVms]:
    """Small block-mode VMs (random data) for the hosts; the rest of the 4 GiB disk holds their snapshots."""
    wait_for_disks((disk,))
    remove_volume_group(VG)
    clear_disk(disk)
    create_volume_group(VG, disk)
    hashes = {}
    for vm in vms:
        run("lvcreate", "-q", "-y", "-n", vm, "-L", f"{VM_SIZE_MIB}M", VG)
        device = Path(f"/dev/{VG}/{vm}")
        run("dd", "if=/dev/urandom", f"of={device}", "bs=1M", f"count={VM_SIZE_MIB}", "oflag=direct", "status=none",
            timeout=120)
        hashes[vm] = sha256_file(device)
    try:
        yield FleetVms(hashes)
    finally:
        remove_volume_group(VG, disk)


@dataclass(frozen=True)
class Repo:
    """A repository the whole fleet shares, and how restic itself reaches it (for the tests' own checks)."""

    url: str
    repository_lines: str = ""
    """More [repository] lines every host needs for it (sftp key, known_hosts)."""
    sftp_command: str | None = None

    def env(self) -> dict[str, str]:
        env = {"RESTIC_REPOSITORY": self.url, "RESTIC_PASSWORD_FILE": str(PASSWORD),
               "RESTIC_CACHE_DIR": "/var/cache/xbtest-restic"}
        if S3_ENV.exists() and self.url.startswith("s3:"):
            for line in S3_ENV.read_text().splitlines():
                key, _, value = line.partition("=")
                env[key] = value
        return env

    def restic(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        extra = ["-o", f"sftp.command={self.sftp_command}"] if self.sftp_command else []
        out = run("restic", *extra, *args, env=self.env(), check=check, timeout=timeout)
        return out.stdout

    def snapshots(self) -> list[dict[str, object]]:
        return json.loads(self.restic("snapshots", "--json", "--no-lock") or "[]")  # type: ignore[no-any-return]

    def locks(self, known: dict[str, dict[str, object]] | None = None) -> list[dict[str, object]]:
        """restic's lock files (exclusive, hostname, pid) as they are now; vanished ones are skipped.

        A lock file never changes under its ID, so a poll passes `known` and reads each one once: every
        restic here derives its key anew (scrypt) and, over sftp, opens an ssh session, on the one vCPU the
        restic being waited for needs too."""
        known = {} if known is None else known
        found = []
        for lock_id in self.restic("list", "locks", "--no-lock").split():
            if lock_id not in known:
                text = self.restic("cat", "lock", lock_id, "--no-lock", check=False)
                if not text.strip():
                    continue
                known[lock_id] = json.loads(text)
            found.append(known[lock_id])
        return found


def write_shared_secrets(s3_environment: str = "") -> None:
    FLEET_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not PASSWORD.exists():
        PASSWORD.write_text(secrets.token_hex(24) + "\n")
    if s3_environment:
        S3_ENV.write_text(s3_environment)
    for path in (PASSWORD, S3_ENV):
        if path.exists():
            os.chmod(path, 0o600)


@dataclass(frozen=True)
class Host:
    """One fleet member: its config, its VM (a block-mode LV in VG `fleet`) and its units' drop-ins."""

    name: str
    vm: str

    @property
    def config(self) -> Path:
        return FLEET_DIR / f"{self.name}.toml"

    @property
    def unit(self) -> str:
        return f"xenbackup@{self.vm}.service"

    def write_config(self, repo: Repo, prune: bool = False, credential: bool = False, extra: str = "",
                     unit: bool = True) -> None:
        """The host's config (and, with `unit`, its backup unit's drop-in); S3 keys from environment_file, or
        (credential=True) from the systemd credential."""
        env_line = "" if credential or not repo.url.startswith("s3:") else f'environment_file = "{S3_ENV}"\n'
        text = textwrap.dedent(f"""\
            [repository]
            url = "{repo.url}"
            host = "{self.name}"
            password_file = "{PASSWORD}"
            cache_dir = "/var/cache/xenbackup/{self.name}"
            prune = {"true" if prune else "false"}
            lock_wait = "10min"
            """) + env_line + repo.repository_lines + extra + textwrap.dedent(f"""\
            [settings]
            runtime_dir = "/run/xenbackup/{self.name}"
            state_dir = "/var/lib/xenbackup/{self.name}"
            metrics_file = "/var/lib/xenbackup/{self.name}/xenbackup.prom"
            [defaults]
            keep_last = 3
            [vm.{self.vm}]
            hypervisor = "none"
            snapshot_size = "16M"
            disks = [{{ lv = "{VG}/{self.vm}", mode = "block" }}]
            """)
        self.config.write_text(text)
        if unit:
            self.drop_in(self.unit, credential)

    def drop_in(self, unit: str, credential: bool = False) -> None:
        """Point one of the product's units at this host's config, as each machine's /etc would."""
        directory = UNIT_DIR / f"{unit}.d"
        directory.mkdir(parents=True, exist_ok=True)
        lines = ["[Service]", f"Environment=XENBACKUP_CONFIG={self.config}"]
        if credential:
            lines.append(f"LoadCredential=restic-environment:{S3_ENV}")
        (directory / "fleet.conf").write_text("\n".join(lines) + "\n")

    def xenbackup(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        return run("xenbackup", "--config", str(self.config), *args, check=check, timeout=timeout).stdout


def daemon_reload() -> None:
    run("systemctl", "daemon-reload", timeout=120)


def remove_drop_ins(units: list[str]) -> None:
    for unit in units:
        run("systemctl", "stop", unit, check=False, timeout=300)
        run("systemctl", "reset-failed", unit, check=False)
        drop_in = UNIT_DIR / f"{unit}.d" / "fleet.conf"
        drop_in.unlink(missing_ok=True)
    daemon_reload()


def unit_state(unit: str) -> str:
    return run("systemctl", "show", "-p", "ActiveState", "--value", unit).stdout.strip()


PRUNE_UNIT = "xenbackup-prune.service"


def start_and_wait(units: list[str], journal: Journal, timeout: float = 600) -> None:
    """Start the units together and wait for all of them; each must end inactive (success)."""
    for unit in units:
        run("systemctl", "start", "--no-block", unit)
    wait_all(units, journal, timeout)


def wait_all(units: list[str], journal: Journal, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    for unit in units:
        while unit_state(unit) not in ("inactive", "failed"):
            assert time.monotonic() < deadline, journal.text("-u", unit)
            time.sleep(1)
        assert unit_state(unit) == "inactive", journal.text("-u", unit)


def newest_pid(pattern: str, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while True:
        if found := processes_matching(pattern):
            return found[-1][0]
        assert time.monotonic() < deadline, f"no process matching {pattern!r}"
        time.sleep(0.05)


def runs_by_host(repo: Repo) -> dict[str, int]:
    """How many backup runs (run: tags) of each host the repository holds."""
    runs: dict[str, set[str]] = {}
    for snap in repo.snapshots():
        tags = [str(t) for t in snap.get("tags", [])]  # type: ignore[attr-defined]
        runs.setdefault(str(snap["hostname"]), set()).update(t for t in tags if t.startswith("run:"))
    return {host: len(ids) for host, ids in runs.items()}


def backups_meet_the_prune(repo: Repo, hosts: tuple[Host, ...], journal: Journal) -> int:
    """The designated host's prune takes restic's exclusive lock, then every host's backup starts.

    The prune reads at [repository] limit_download (1 KiB/s on the designated host), and once its lock
    exists its restic is held still (SIGSTOP) until a backup has logged that it waits for it, so the meeting
    does not depend on timing; then it goes on and everything finishes. Returns the prune's restic PID."""
    run("systemctl", "start", "--no-block", PRUNE_UNIT)
    prune_pid = newest_pid(r"(^|/)restic .* prune")
    deadline = time.monotonic() + 120
    known: dict[str, dict[str, object]] = {}
    while not [lock for lock in repo.locks(known) if lock.get("exclusive") and lock.get("pid") == prune_pid]:
        assert unit_state(PRUNE_UNIT) in ("activating", "active"), journal.text("-u", PRUNE_UNIT)
        assert time.monotonic() < deadline, f"the prune (PID {prune_pid}) took no exclusive lock"
        time.sleep(1)
    os.kill(prune_pid, signal.SIGSTOP)
    try:
        for host in hosts:
            run("systemctl", "start", "--no-block", host.unit)
        deadline = time.monotonic() + 300
        while not [e for h in hosts for e in journal.entries("-u", h.unit) if "XENBACKUP_LOCK_PID" in e]:
            assert time.monotonic() < deadline, "\n".join(journal.text("-u", h.unit) for h in hosts)
            time.sleep(2)
    finally:
        os.kill(prune_pid, signal.SIGCONT)
    wait_all([PRUNE_UNIT, *(h.unit for h in hosts)], journal)
    return prune_pid


def check_the_prune_was_waited_for(prune_pid: int, hosts: tuple[Host, ...], journal: Journal) -> None:
    """At least one backup logged the prune's lock (its PID, the backup phase) and then got the lock."""
    entries = [e for h in hosts for e in journal.entries("-u", h.unit)]
    waits = [e for e in entries if "XENBACKUP_LOCK_PID" in e]
    assert waits and all(e["XENBACKUP_LOCK_PID"] == str(prune_pid) for e in waits), waits
    assert all(e["XENBACKUP_PHASE"] == "backup" and e["XENBACKUP_LOCK_HOST"] for e in waits), waits
    assert any("got the repository lock after waiting" in str(e["MESSAGE"]) for e in entries)
