"""Smoke tests: a Xen dom0 under TCG runs PV guests whose disks are LVs or files."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

from vmlib import xen
from vmlib.cmd import output, run, tree_hashes
from vmlib.storage import create_volume_group, mounted_snapshot

SNAPSHOT_MOUNT = Path("/mnt/vmbackup")


def test_dom0_runs_the_xen_toolstack(xen_dom0: None) -> None:
    info = {}
    for line in output("xl", "info").splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    assert (info["xen_major"], info["xen_minor"]) == ("4", "17")
    assert "pv" in info["virt_caps"].split()
    assert [line.split()[0] for line in output("xl", "list").splitlines()[1:]] == ["Domain-0"]


def write_marker_direct(device: Path, marker: str, scratch: Path) -> None:
    """Write the marker with O_DIRECT: blkback reads the device, not dom0's page cache."""
    block = scratch / "marker.block"
    block.write_bytes((marker + "\n").encode().ljust(4096, b"\0"))
    run("dd", f"if={block}", f"of={device}", "bs=4096", "count=1", "oflag=direct", "status=none")


def test_pv_guest_on_an_lv_reads_its_marker_and_is_gone_after_shutdown(
    domu_initramfs: Path, blank_disk: Path, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    create_volume_group("xbxen", blank_disk)
    run("lvcreate", "--yes", "-L", "64M", "-n", "domu", "xbxen")
    marker = f"XBMARKER lv {secrets.token_hex(8)}"
    write_marker_direct(Path("/dev/xbxen/domu"), marker, tmp_path)
    config = xen.DomU("xbsmoke", xen.domu_kernel(), domu_initramfs, Path("/dev/xbxen/domu")).write_config(
        tmp_path / "xbsmoke.cfg"
    )

    # Two rounds: the second `xl create` of the same name, right after the
    # first shutdown returned, fails unless shutdown waited for the domain to go.
    for round_ in (1, 2):
        with xen.running(config, "xbsmoke") as domain:
            assert domain.marker == marker
            assert xen.domain_exists("xbsmoke")
            record_property(f"create_seconds_{round_}", f"{domain.create_seconds:.1f}")
            record_property(f"ready_seconds_{round_}", f"{domain.ready_seconds:.1f}")
        assert not xen.domain_exists("xbsmoke")
        assert "xbsmoke" not in output("xl", "list")
        assert run("xl", "domid", "xbsmoke", check=False).returncode != 0


def test_seed_vm1_boots_from_its_file_disk_and_is_snapshotted_while_running(vm1: xen.SeedVm) -> None:
    layout = vm1.layout
    assert vm1.domain.marker == layout.marker, "vm1 must read its own disk image"
    assert xen.domain_exists(layout.vm)

    with mounted_snapshot(layout.vg, layout.lv, "vmbackup", layout.fstype, SNAPSHOT_MOUNT) as snapshot:
        assert tree_hashes(snapshot / layout.vm) == layout.files
