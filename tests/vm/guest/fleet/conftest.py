"""Fixtures of the fleet suite: the shared repositories (Ceph RGW, SFTP), started once per boot.

    ceph          a single-node Ceph cluster with radosgw on 127.0.0.1:7480 and one S3 user
                  (vmlib.ceph.Ceph: .endpoint .user .timings .url(bucket)), OSD on virtio-xbtest3
    sftp          sshd with a `backup` user, key authentication and pinned known_hosts
                  (vmlib.sftp.SftpServer)
    fleet_vms     VG `fleet` on virtio-xbtest2 with one small LV per "host"'s VM, filled with random data
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmlib.ceph import Ceph, start_cluster
from vmlib.fleet import FleetVms, fleet_volume_group
from vmlib.sftp import SftpServer, start_sftp
from vmlib.storage import BLANK_DISKS, clear_disk, wait_for_disks

RESULTS = Path("/mnt/results")


@pytest.fixture(scope="session")
def ceph() -> Ceph:
    """Started once: under TCG the cluster takes two to three minutes to serve S3. test_rgw.py, the only module
    that uses it, stops it when its tests are done."""
    wait_for_disks((BLANK_DISKS[2],))
    clear_disk(BLANK_DISKS[2])
    cluster = start_cluster(BLANK_DISKS[2])
    print(f"Ceph up: {cluster.timings}")
    if RESULTS.is_dir():
        (RESULTS / "ceph-timings.json").write_text(json.dumps(cluster.timings, indent=1) + "\n")
    return cluster


@pytest.fixture(scope="session")
def sftp() -> SftpServer:
    started = time.monotonic()
    server = start_sftp(Path("/etc/xenbackup/fleet-ssh"))
    print(f"sshd up in {time.monotonic() - started:.1f} s")
    return server


@pytest.fixture(scope="session")
def fleet_vms() -> Iterator[FleetVms]:
    with fleet_volume_group(BLANK_DISKS[1]) as vms:
        yield vms
