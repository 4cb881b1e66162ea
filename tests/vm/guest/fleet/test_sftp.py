"""Three hosts and one SFTP repository: the same meeting with the prune, and a wrong host key refused."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from vmlib.cmd import run
from vmlib.fleet import (
    PRUNE_UNIT,
    FleetVms,
    Host,
    Repo,
    backups_meet_the_prune,
    check_the_prune_was_waited_for,
    daemon_reload,
    remove_drop_ins,
    runs_by_host,
    start_and_wait,
    unit_state,
    write_shared_secrets,
)
from vmlib.product import Journal, our_mounts, our_snapshots
from vmlib.sftp import SftpServer

HOSTS = (Host("xen1", "vm4"), Host("xen2", "vm5"), Host("xen3", "vm6"))

# Over the guest's 600 s per test: the three-host test took 378 s on a slow CI machine.
pytestmark = pytest.mark.timeout(1200)


def sftp_repo(server: SftpServer, known_hosts: str) -> Repo:
    lines = f'sftp_identity = "{server.identity}"\nsftp_known_hosts = "{known_hosts}"\n'
    command = (f"ssh -i {server.identity} -o IdentitiesOnly=yes -o UserKnownHostsFile={server.known_hosts}"
               " -o StrictHostKeyChecking=yes backup@localhost -s sftp")
    return Repo(server.url, lines, command)


@pytest.fixture(scope="module")
def repo(sftp: SftpServer, fleet_vms: FleetVms) -> Iterator[Repo]:
    write_shared_secrets()
    shared = sftp_repo(sftp, str(sftp.known_hosts))
    HOSTS[0].write_config(shared, prune=True, extra="limit_download = 1\n")
    for host in HOSTS[1:]:
        host.write_config(shared)
    HOSTS[0].drop_in(PRUNE_UNIT)
    daemon_reload()
    HOSTS[0].xenbackup("init")
    yield shared
    remove_drop_ins([*(h.unit for h in HOSTS), PRUNE_UNIT])


def test_three_hosts_back_up_at_once_to_sftp_while_the_designated_host_prunes(repo: Repo) -> None:
    journal = Journal()
    started = time.monotonic()
    start_and_wait([h.unit for h in HOSTS], journal)
    print(f"three backups at once: {time.monotonic() - started:.0f} s")
    started = time.monotonic()
    prune_pid = backups_meet_the_prune(repo, HOSTS, journal)
    print(f"prune + three backups: {time.monotonic() - started:.0f} s")
    check_the_prune_was_waited_for(prune_pid, HOSTS, journal)
    assert runs_by_host(repo) == {"xen1": 2, "xen2": 2, "xen3": 2}
    repo.restic("check")
    assert our_snapshots() == [] and our_mounts() == []


def test_a_wrong_host_key_is_refused_with_a_clear_line(repo: Repo, sftp: SftpServer) -> None:
    host = HOSTS[2]
    before = runs_by_host(repo)
    host.write_config(sftp_repo(sftp, str(sftp.wrong_known_hosts)))
    daemon_reload()
    journal = Journal()
    try:
        result = run("systemctl", "start", host.unit, check=False, timeout=600)
        assert result.returncode != 0 and unit_state(host.unit) == "failed"
        text = journal.text("-u", host.unit)
        refused = [line for line in text.splitlines() if "Host key verification failed" in line]
        assert refused and any(sftp.url in line or "sftp:" in line for line in text.splitlines()), text
        assert our_snapshots() == [] and our_mounts() == []
        assert runs_by_host(repo) == before
    finally:
        run("systemctl", "reset-failed", host.unit, check=False)
        host.write_config(repo)
        daemon_reload()
