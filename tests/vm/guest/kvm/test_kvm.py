"""xenbackup against a real libvirtd: a qemu domain kvm1 running from two LVs (TCG inside the TCG guest).

One domain serves the whole module, so the tests run in file order: the
domain boots and reads its disks, `plan` discovers them, the unit backs both
up inside one pause, and `restore --stop` brings back damaged disks and
starts the domain, which reads its original markers again.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from vmlib import kvm
from vmlib.cmd import run, sha256_file
from vmlib.product import TCG_MAX_PAUSE, Journal, Xb, our_mounts, our_snapshots, remove_state, sh
from vmlib.storage import BLANK_DISKS, create_volume_group, remove_volume_group, wait_for_disks

VG = "system"
VM = "kvm1"
UNIT = f"xenbackup@{VM}.service"
LV_SIZES = {"kvm1-root": 64, "kvm1-data": 32}
"""MiB; small, because restic reads every byte of a block-mode disk under TCG."""
READY_TIMEOUT = 600
"""Seconds from `virsh start` to READY: TCG inside TCG (see tests/vm/README.md for what it takes)."""
SHUTDOWN_TIMEOUT = 10
"""The busybox guest ignores ACPI, so restore --stop destroys it after this."""
LVCREATE_LOG = Path("/run/xbtest/kvm-lvcreate.log")
# On the root filesystem: /run is mounted noexec.
LVCREATE_RECORDER = Path("/usr/local/sbin/xbtest-lvcreate-recorder")
LVCREATE_RECORDER_TEXT = f"""#!/bin/sh
# Notes the domain's state at each lvcreate call, then runs the real lvcreate.
echo "$(/usr/bin/virsh domstate {VM} 2>&1 | head -n 1)|$*" >>{LVCREATE_LOG}
exec /sbin/lvcreate "$@"
"""
CONFIG_TEXT = f"""
[settings]
shutdown_timeout = {SHUTDOWN_TIMEOUT}

[commands]
lvcreate = "{LVCREATE_RECORDER}"

[vm.{VM}]
hypervisor = "kvm"
snapshot_size = "32M"
max_pause = {TCG_MAX_PAUSE}
"""


@dataclass(frozen=True)
class KvmDisks:
    markers: dict[str, str]
    """The first line of each LV, by LV name."""
    hashes: dict[str, str]
    """sha256 of each whole LV, by LV name."""

    @staticmethod
    def device(lv: str) -> Path:
        return Path(f"/dev/{VG}/{lv}")


@dataclass(frozen=True)
class KvmGuest:
    domain: kvm.KvmDomain
    disks: KvmDisks
    boot: kvm.GuestBoot
    libvirtd_seconds: float


def write_lv(device: Path, first_line: str, size_mib: int) -> None:
    """Fill the whole LV: its first line, 1 MiB of random bytes, zeros; O_DIRECT, so no stale page cache."""
    content = (first_line + "\n").encode() + os.urandom(2**20)
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as image:
        image.write(content)
        image.truncate(size_mib * 2**20)
        image.flush()
        run("dd", f"if={image.name}", f"of={device}", "bs=1M", "oflag=direct", "conv=fsync", "status=none")


def damage(device: Path) -> None:
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as block:
        block.write(b"DAMAGED\n".ljust(4096, b"\0"))
        block.flush()
        run("dd", f"if={block.name}", f"of={device}", "bs=4096", "count=1", "oflag=direct", "conv=notrunc,fsync",
            "status=none")


def first_line(device: Path) -> str:
    with open(device, "rb") as disk:
        return disk.readline(300).decode(errors="replace").rstrip("\n")


@pytest.fixture(scope="module")
def libvirtd() -> float:
    return kvm.start_libvirtd()


@pytest.fixture(scope="module")
def kvm_disks() -> Iterator[KvmDisks]:
    disk = BLANK_DISKS[0]
    wait_for_disks((disk,))
    remove_volume_group(VG, disk)
    create_volume_group(VG, disk)
    markers = {}
    for lv, size in LV_SIZES.items():
        run("lvcreate", "--yes", "-n", lv, "-L", f"{size}M", VG, timeout=180)
        markers[lv] = f"{lv} {secrets.token_hex(8)}"
        write_lv(KvmDisks.device(lv), markers[lv], size)
    hashes = {lv: sha256_file(KvmDisks.device(lv)) for lv in LV_SIZES}
    yield KvmDisks(markers, hashes)
    remove_volume_group(VG, disk)


@pytest.fixture(scope="module")
def kvm1(libvirtd: float, kvm_disks: KvmDisks) -> Iterator[KvmGuest]:
    """kvm1 running, both markers read by the guest; destroyed and undefined afterwards."""
    kernel, initrd = kvm.prepare_boot_files(VM)
    disks = (
        kvm.GuestDisk(Path(f"/dev/{VG}/kvm1-root"), "vda"),
        # The other spelling libvirt configs use; dashes in VG and LV names double.
        kvm.GuestDisk(Path(f"/dev/mapper/{VG}-kvm1--data"), "vdb"),
    )
    with kvm.defined(kvm.KvmDomain(VM, kernel, initrd, disks)) as domain:
        boot = kvm.start(domain, READY_TIMEOUT)
        yield KvmGuest(domain, kvm_disks, boot, libvirtd)


def reset_product() -> None:
    sh("systemctl", "stop", UNIT, check=False)
    sh("systemctl", "reset-failed", UNIT, check=False)
    remove_state()


@pytest.fixture(scope="module")
def xb() -> Iterator[Xb]:
    """The product configured for kvm1 with discovery (no `disks` key); reset afterwards."""
    reset_product()
    LVCREATE_RECORDER.parent.mkdir(parents=True, exist_ok=True)
    LVCREATE_RECORDER.write_text(LVCREATE_RECORDER_TEXT)
    LVCREATE_RECORDER.chmod(0o755)
    LVCREATE_LOG.unlink(missing_ok=True)
    product = Xb(vm=VM)
    product.write_config(CONFIG_TEXT)
    yield product
    reset_product()
    LVCREATE_RECORDER.unlink(missing_ok=True)


def test_domain_runs_from_two_lvs_under_nested_tcg(kvm1: KvmGuest, record_property) -> None:
    record_property("libvirtd_start_seconds", f"{kvm1.libvirtd_seconds:.1f}")
    record_property("virsh_start_seconds", f"{kvm1.boot.start_seconds:.1f}")
    record_property("ready_seconds", f"{kvm1.boot.ready_seconds:.1f}")
    print(f"libvirtd answered after {kvm1.libvirtd_seconds:.1f}s; virsh start took {kvm1.boot.start_seconds:.1f}s;"
          f" the guest was ready {kvm1.boot.ready_seconds:.1f}s after the start; its console:\n{kvm1.boot.console}")
    assert kvm.domstate(VM) == "running"
    assert kvm.qemu_pid(VM) is not None, "no qemu process for kvm1"
    assert kvm1.boot.marker("vda") == kvm1.disks.markers["kvm1-root"]
    assert kvm1.boot.marker("vdb") == kvm1.disks.markers["kvm1-data"]
    sources = {
        disk.find("target").get("dev"): disk.find("source").get("dev")  # type: ignore[union-attr]
        for disk in kvm.virsh_xml(VM).iter("disk")
        if disk.get("device") == "disk"
    }
    assert sources == {"vda": f"/dev/{VG}/kvm1-root", "vdb": f"/dev/mapper/{VG}-kvm1--data"}


def test_plan_shows_the_discovered_disks(kvm1: KvmGuest, xb: Xb) -> None:
    plan = sh("xenbackup", "plan", VM, check=False)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    disk_lines = [line for line in plan.stdout.splitlines() if line.startswith("[disks]")]
    # Two disks from `virsh dumpxml`, each in block mode; the empty CD-ROM is not among them.
    assert len(disk_lines) == 2, plan.stdout
    for lv in LV_SIZES:
        assert any(f"{VG}/{lv} block" in line and "domain definition" in line for line in disk_lines), plan.stdout
    assert "virsh suspend kvm1" in plan.stdout and "virsh resume kvm1" in plan.stdout, plan.stdout


def test_unit_backs_up_both_disks_inside_one_pause(kvm1: KvmGuest, xb: Xb) -> None:
    journal = Journal()
    states: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            states.add(kvm.domstate(VM))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = xb.start()
    finally:
        done.set()
        watcher.join(timeout=120)

    assert result.returncode == 0, journal.text("-u", UNIT)
    snapshots = xb.snapshots(f"vm:{VM}", "mode:block")
    disks = sorted(tag for snap in snapshots for tag in snap["tags"] if tag.startswith("disk:"))  # type: ignore[union-attr]
    assert disks == [f"disk:{VG}/kvm1-data", f"disk:{VG}/kvm1-root"], snapshots
    runs = {tag for snap in snapshots for tag in snap["tags"] if tag.startswith("run:")}  # type: ignore[union-attr]
    assert len(runs) == 1, snapshots
    windows = [entry for entry in journal.entries("-u", UNIT) if "XENBACKUP_CONSISTENCY" in entry]
    assert windows, journal.text("-u", UNIT)
    assert {entry["XENBACKUP_CONSISTENCY"] for entry in windows} == {"pause"}, windows
    paused = [float(str(entry["XENBACKUP_PAUSE_SECONDS"])) for entry in windows]
    assert all(0 < seconds < TCG_MAX_PAUSE for seconds in paused), windows
    assert not [e for e in windows if "cut short" in str(e["MESSAGE"])], windows
    # Both snapshots were created while kvm1 was suspended, as the recorder saw it at each lvcreate.
    calls = [line.split("|", 1) for line in LVCREATE_LOG.read_text().splitlines()]
    assert [state for state, _ in calls] == ["paused", "paused"], calls
    assert sorted(argv.split()[-1] for _, argv in calls) == [f"{VG}/kvm1-data", f"{VG}/kvm1-root"], calls
    print(f"kvm1 was paused for {paused[0]:.1f}s; domain states seen during the run: {sorted(states)}")
    if paused[0] > 2:  # long enough for the watcher's 0.5 s polls to see it
        assert "paused" in states, states
    assert kvm.domstate(VM) == "running"
    assert our_snapshots() == [] and our_mounts() == []


def test_restore_stop_brings_back_both_disks_and_the_guest_reads_its_marker(kvm1: KvmGuest, xb: Xb) -> None:
    assert xb.snapshots(f"vm:{VM}", "mode:block"), "no backup of kvm1: the backup test must run first"
    for lv in LV_SIZES:
        damage(KvmDisks.device(lv))
        assert first_line(KvmDisks.device(lv)) == "DAMAGED"
    offset = kvm.console_size(kvm1.domain)
    started = time.monotonic()

    restore = sh("xenbackup", "restore", VM, "--stop", check=False, timeout=900)

    restored = time.monotonic() - started
    assert restore.returncode == 0, restore.stdout + restore.stderr
    for lv in LV_SIZES:
        assert sha256_file(KvmDisks.device(lv)) == kvm1.disks.hashes[lv], f"{lv} differs from the backup"
    boot = kvm.wait_ready(kvm1.domain, offset, READY_TIMEOUT)
    print(f"restore --stop took {restored:.1f}s; the guest was ready {boot.ready_seconds:.1f}s after that")
    assert boot.marker("vda") == kvm1.disks.markers["kvm1-root"]
    assert boot.marker("vdb") == kvm1.disks.markers["kvm1-data"]
    assert kvm.domstate(VM) == "running"
    assert our_snapshots() == [] and our_mounts() == []
