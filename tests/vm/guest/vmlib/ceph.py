"""A single-node Ceph cluster with its RADOS Gateway, started by hand the way the test bed notes measured it.

One mon, one mgr, one BlueStore OSD on a blank virtio disk, radosgw on 127.0.0.1:7480 and one S3 user.
Every step that waits has a hard limit: the `ceph` CLI itself waits 300 s for a monitor by default, so each
call gets --connect-timeout and a subprocess timeout. The fleet suite starts it once per boot
(tests/vm/guest/fleet/conftest.py); bench/fleet-in-guest.py does the same for the scale figure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from vmlib.cmd import run

NAME = "xb"
"""The id of the mon, the mgr and (as rgw.xb) the gateway."""
RGW_PORT = 7480
RGW_ENDPOINT = f"http://127.0.0.1:{RGW_PORT}"
CONF = Path("/etc/ceph/ceph.conf")
ADMIN_KEYRING = Path("/etc/ceph/ceph.client.admin.keyring")
BOOTSTRAP_OSD_KEYRING = Path("/var/lib/ceph/bootstrap-osd/ceph.keyring")
RGW_UNIT = f"ceph-radosgw@rgw.{NAME}.service"
CLI_TIMEOUT = 60.0

# size 1 and no chooseleaf: one OSD must hold every placement group. Few PGs: each one peers under TCG, and
# radosgw's eight pools at the default 32 would pass mon_max_pg_per_osd on a single OSD. The bluestore cache
# is fixed small so that the OSD stays near 150 MB in a 3 GiB guest.
CONF_TEXT = """\
[global]
fsid = {fsid}
mon_initial_members = {name}
mon_host = 127.0.0.1
public_network = 127.0.0.0/8
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_max_pg_per_osd = 500
bluestore_cache_autotune = false
bluestore_cache_size = 128M
osd_memory_target = 939524096

[client.rgw.{name}]
rgw_frontends = beast endpoint=127.0.0.1:{port}
rgw_dns_name = localhost
"""


@dataclass(frozen=True)
class S3User:
    access_key: str
    secret_key: str = field(repr=False)

    def environment(self) -> str:
        """The lines of an environment_file (or the restic-environment credential) for restic."""
        return f"AWS_ACCESS_KEY_ID={self.access_key}\nAWS_SECRET_ACCESS_KEY={self.secret_key}\n"


@dataclass(frozen=True)
class Ceph:
    """A running cluster: its S3 endpoint, one user, and how long each step took (seconds from the start)."""

    endpoint: str
    user: S3User
    timings: dict[str, float]

    def url(self, bucket: str) -> str:
        """restic's repository URL for a bucket (restic creates it on init)."""
        return f"s3:{self.endpoint}/{bucket}"


def ceph(*args: str, timeout: float = CLI_TIMEOUT) -> str:
    """One `ceph` CLI call that gives up instead of waiting five minutes for a monitor."""
    return run("ceph", "--connect-timeout", "20", *args, timeout=timeout).stdout


def _keyring(path: Path, name: str, *caps: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = ["ceph-authtool", "--create-keyring", str(path), "--gen-key", "-n", name]
    for i in range(0, len(caps), 2):
        argv += ["--cap", caps[i], caps[i + 1]]
    run(*argv, timeout=CLI_TIMEOUT)


def _chown_ceph(path: Path) -> None:
    run("chown", "-R", "ceph:ceph", str(path), timeout=CLI_TIMEOUT)


def _wait(what: str, ready: object, timeout: float, interval: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            if ready():  # type: ignore[operator]
                return
        except (subprocess.SubprocessError, AssertionError, OSError, ValueError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"Ceph: {what} not reached within {timeout:.0f} s (last error: {last})")
        time.sleep(interval)


def _journal_of(unit: str) -> str:
    return subprocess.run(["journalctl", "--no-pager", "-n", "40", "-u", unit], capture_output=True, text=True,
                          timeout=30, check=False).stdout


def start_mon(work: Path) -> None:
    fsid = str(uuid.uuid4())
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(CONF_TEXT.format(fsid=fsid, name=NAME, port=RGW_PORT))
    mon_keyring = work / "ceph.mon.keyring"
    _keyring(mon_keyring, "mon.", "mon", "allow *")
    _keyring(ADMIN_KEYRING, "client.admin", "mon", "allow *", "osd", "allow *", "mds", "allow *", "mgr", "allow *")
    _keyring(BOOTSTRAP_OSD_KEYRING, "client.bootstrap-osd", "mon", "profile bootstrap-osd", "mgr", "allow r")
    for imported in (ADMIN_KEYRING, BOOTSTRAP_OSD_KEYRING):
        run("ceph-authtool", str(mon_keyring), "--import-keyring", str(imported), timeout=CLI_TIMEOUT)
    monmap = work / "monmap"
    run("monmaptool", "--create", "--add", NAME, "127.0.0.1", "--fsid", fsid, str(monmap), timeout=CLI_TIMEOUT)
    _chown_ceph(work)
    mon_dir = Path(f"/var/lib/ceph/mon/ceph-{NAME}")
    mon_dir.mkdir(parents=True, exist_ok=True)
    _chown_ceph(mon_dir)
    run("ceph-mon", "--mkfs", "-i", NAME, "--monmap", str(monmap), "--keyring", str(mon_keyring),
        "--setuser", "ceph", "--setgroup", "ceph", timeout=120)
    run("systemctl", "start", f"ceph-mon@{NAME}.service", timeout=CLI_TIMEOUT)
    _wait("the monitor answering", lambda: ceph("mon", "stat"), 120)


def start_mgr() -> None:
    mgr_dir = Path(f"/var/lib/ceph/mgr/ceph-{NAME}")
    mgr_dir.mkdir(parents=True, exist_ok=True)
    ceph("auth", "get-or-create", f"mgr.{NAME}", "mon", "allow profile mgr", "osd", "allow *", "mds", "allow *",
         "-o", str(mgr_dir / "keyring"))
    _chown_ceph(mgr_dir)
    run("systemctl", "start", f"ceph-mgr@{NAME}.service", timeout=CLI_TIMEOUT)


def start_osd(disk: Path) -> None:
    _chown_ceph(BOOTSTRAP_OSD_KEYRING.parent)
    # ceph-volume makes a VG and an LV on the disk, prepares BlueStore and starts ceph-osd@0 itself.
    run("ceph-volume", "lvm", "create", "--bluestore", "--data", str(disk), timeout=600)

    def osd_up() -> bool:
        return int(json.loads(ceph("osd", "stat", "-f", "json"))["num_up_osds"]) >= 1

    _wait("one OSD up", osd_up, 300)


def start_rgw() -> None:
    rgw_dir = Path(f"/var/lib/ceph/radosgw/ceph-rgw.{NAME}")
    rgw_dir.mkdir(parents=True, exist_ok=True)
    ceph("auth", "get-or-create", f"client.rgw.{NAME}", "mon", "allow rw", "osd", "allow rwx",
         "-o", str(rgw_dir / "keyring"))
    _chown_ceph(rgw_dir)
    run("systemctl", "start", RGW_UNIT, timeout=CLI_TIMEOUT)
    wait_for_rgw(300)


def rgw_answers() -> bool:
    """True once radosgw answers HTTP (an anonymous GET of the service root lists no buckets)."""
    try:
        with urllib.request.urlopen(RGW_ENDPOINT + "/", timeout=10) as response:
            return int(response.status) == 200
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (urllib.error.URLError, OSError):
        return False


def wait_for_rgw(timeout: float) -> None:
    try:
        _wait("radosgw answering HTTP", rgw_answers, timeout, interval=1.0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_journal_of(RGW_UNIT)}") from None


def stop_rgw() -> None:
    run("systemctl", "stop", RGW_UNIT, timeout=120)


def stop_cluster() -> None:
    """Every daemon of the cluster. Idle, they still take a good share of a one-vCPU guest under TCG, which
    the tests that need no Ceph (the SFTP repository) are better given."""
    run("systemctl", "stop", RGW_UNIT, "ceph-osd@0.service", f"ceph-mgr@{NAME}.service", f"ceph-mon@{NAME}.service",
        timeout=300)


def start_rgw_again(timeout: float = 180) -> None:
    run("systemctl", "start", RGW_UNIT, timeout=CLI_TIMEOUT)
    wait_for_rgw(timeout)


def create_user(uid: str) -> S3User:
    """An S3 user with generated keys: the secret never appears in an argv, only in radosgw-admin's output."""
    out = run("radosgw-admin", "user", "create", f"--uid={uid}", f"--display-name={uid}", timeout=120).stdout
    key = json.loads(out)["keys"][0]
    return S3User(key["access_key"], key["secret_key"])


def start_cluster(disk: Path, work: Path = Path("/run/xbtest-ceph")) -> Ceph:
    """mon, mgr, OSD on `disk`, radosgw and an S3 user; each step's finishing time is recorded."""
    for binary in ("ceph-mon", "ceph-mgr", "ceph-osd", "radosgw", "ceph-volume", "radosgw-admin"):
        assert shutil.which(binary), f"{binary} is not in the image (tests/vm/image/packages.txt)"
    started = time.monotonic()
    timings: dict[str, float] = {}
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o750)
    for step, action in (
        ("mon answering", lambda: start_mon(work)),
        ("mgr started", start_mgr),
        ("OSD up", lambda: start_osd(disk)),
        ("RGW answering HTTP", start_rgw),
    ):
        try:
            action()
        except (AssertionError, subprocess.SubprocessError) as exc:
            logs = "\n".join(_journal_of(u) for u in (f"ceph-mon@{NAME}", "ceph-osd@0", RGW_UNIT))
            raise AssertionError(f"Ceph: {step} failed: {exc}\n{logs}") from None
        timings[step] = round(time.monotonic() - started, 1)
    user = create_user("fleet")
    timings["S3 user"] = round(time.monotonic() - started, 1)
    return Ceph(RGW_ENDPOINT, user, timings)
