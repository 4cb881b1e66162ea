"""Three hosts and one Ceph RGW bucket: concurrent backups meet the designated host's prune, and wait."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from vmlib.ceph import Ceph
from vmlib.cmd import run
from vmlib.fleet import FleetVms, Host, Repo, daemon_reload, remove_drop_ins, unit_state, write_shared_secrets
from vmlib.product import Journal, our_mounts, our_snapshots

HOSTS = (Host("xen1", "vm1"), Host("xen2", "vm2"), Host("xen3", "vm3"))
PRUNE_UNIT = "xenbackup-prune.service"


@pytest.fixture(scope="module")
def rgw(ceph: Ceph, fleet_vms: FleetVms) -> Iterator[Repo]:
    """The bucket, initialised by xen1; xen1 prunes, and xen2 takes its S3 keys from a systemd credential."""
    write_shared_secrets(ceph.user.environment())
    repo = Repo(ceph.url("xen-backups"))
    HOSTS[0].write_config(repo, prune=True, extra="limit_download = 1\n")
    HOSTS[1].write_config(repo, credential=True)
    HOSTS[2].write_config(repo)
    HOSTS[0].drop_in(PRUNE_UNIT)
    daemon_reload()
    HOSTS[0].xenbackup("init")
    yield repo
    remove_drop_ins([*(h.unit for h in HOSTS), PRUNE_UNIT])


def restic_pid(pattern: str, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while True:
        out = run("pgrep", "-f", "-n", pattern, check=False).stdout.split()
        if out:
            return int(out[0])
        assert time.monotonic() < deadline, f"no process matching {pattern!r}"
        time.sleep(0.05)


def runs_of(repo: Repo) -> dict[str, int]:
    counts: dict[str, int] = {}
    for snap in repo.snapshots():
        counts[str(snap["hostname"])] = counts.get(str(snap["hostname"]), 0) + 1
    return counts


def test_three_hosts_back_up_at_once_while_the_designated_host_prunes(rgw: Repo, fleet_vms: FleetVms) -> None:
    journal = Journal()
    started = time.monotonic()
    run("systemctl", "start", "--no-block", PRUNE_UNIT)
    # The prune holds restic's exclusive lock while it reads the repository at 1 KiB/s; it is held still
    # (SIGSTOP) once the lock exists, so that the backups certainly meet it, and let go once one waits.
    prune_pid = restic_pid(r"(^|/)restic .* prune")
    deadline = time.monotonic() + 120
    while not [lock for lock in rgw.locks() if lock.get("exclusive") and lock.get("pid") == prune_pid]:
        assert unit_state(PRUNE_UNIT) in ("activating", "active"), journal.text("-u", PRUNE_UNIT)
        assert time.monotonic() < deadline, f"the prune (PID {prune_pid}) took no exclusive lock"
        time.sleep(0.2)
    os.kill(prune_pid, signal.SIGSTOP)
    try:
        for host in HOSTS:
            run("systemctl", "start", "--no-block", host.unit)
        deadline = time.monotonic() + 300
        while not [e for h in HOSTS for e in journal.entries("-u", h.unit) if "XENBACKUP_LOCK_PID" in e]:
            assert time.monotonic() < deadline, "\n".join(journal.text("-u", h.unit) for h in HOSTS)
            time.sleep(2)
    finally:
        os.kill(prune_pid, signal.SIGCONT)
    for unit in (PRUNE_UNIT, *(h.unit for h in HOSTS)):
        deadline = time.monotonic() + 600
        while unit_state(unit) not in ("inactive", "failed"):
            assert time.monotonic() < deadline, journal.text("-u", unit)
            time.sleep(1)
        assert unit_state(unit) == "inactive", journal.text("-u", unit)
    print(f"prune + three backups: {time.monotonic() - started:.0f} s")

    waits = [e for h in HOSTS for e in journal.entries("-u", h.unit) if "XENBACKUP_LOCK_PID" in e]
    assert waits and all(e["XENBACKUP_LOCK_PID"] == str(prune_pid) for e in waits), waits
    assert all(e["XENBACKUP_PHASE"] == "backup" for e in waits)
    assert any("got the repository lock after waiting" in str(e["MESSAGE"])
               for h in HOSTS for e in journal.entries("-u", h.unit))
    pruned = journal.text("-u", PRUNE_UNIT)
    assert "restic prune" in pruned or "prun" in pruned, pruned
    assert runs_of(rgw) == {"xen1": 1, "xen2": 1, "xen3": 1}
    rgw.restic("check")
    for snap in rgw.snapshots():
        host = next(h for h in HOSTS if h.name == snap["hostname"])
        assert f"vm:{host.vm}" in snap["tags"], snap  # type: ignore[operator]
    assert our_snapshots() == [] and our_mounts() == []
