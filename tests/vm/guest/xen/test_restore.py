"""xenbackup restore against a real Xen 4.17 dom0: stop the PV guest, restore, verify, start it again."""

from __future__ import annotations

import os
import re
import secrets
import stat
import time
from pathlib import Path

from vmlib import xen
from vmlib.product import Journal, Xb, sh
from vmlib.xen import SeedVm

FILES_CONFIG = """
[vm.vm1]
domain_config = "{cfg}"
snapshot_size = "256M"
disks = [{{ lv = "system/xenvm", mode = "files", path = "vm1" }}]
"""


def metadata(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything a restore must bring back, per path: bytes, mode, owner, mtime, xattrs, links, sparseness."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
                continue
            xattrs = tuple(sorted((k, os.getxattr(p, k)) for k in os.listxattr(p) if k.startswith("user.")))
            content = sh("sha256sum", str(p)).stdout.split()[0] if stat.S_ISREG(st.st_mode) else None
            mtime = st.st_mtime_ns if stat.S_ISREG(st.st_mode) else None
            blocks = st.st_blocks if stat.S_ISREG(st.st_mode) else None
            out[rel] = (content, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, mtime, xattrs, st.st_nlink, blocks)
    return out


def add_odd_files(vmdir: Path) -> None:
    odd = vmdir / "odd dir ü" / "deeper"
    odd.mkdir(parents=True)
    (odd / "name with space\nand newline ü.txt").write_text("odd\n")
    hard = vmdir / "hard1"
    hard.write_bytes(os.urandom(5000))
    os.link(hard, odd / "hard2")
    os.setxattr(hard, "user.xenbackup", b"kept")
    os.symlink("disk.img", vmdir / "link-to-disk")
    sparse = vmdir / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"data in the middle of a hole")
    owned = vmdir / "owned.txt"
    owned.write_text("owned by someone else\n")
    os.chown(owned, 1234, 5678)
    os.chmod(owned, 0o640)
    os.utime(owned, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    sh("sync")


def console_since(name: str, offset: int, want: str, timeout: float = 300) -> str:
    log = xen.console_log(name)
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_bytes()[offset:].decode(errors="replace") if log.exists() else ""
        if want in text:
            return text
        assert time.monotonic() < deadline, f"{want!r} not on {name}'s console:\n{text[-2000:]}"
        time.sleep(0.5)


def domid(name: str) -> str:
    return sh("xl", "domid", name).stdout.strip()


def test_files_restore_stops_restores_and_restarts_the_guest(vm1: SeedVm, xb: Xb, journal: Journal) -> None:
    layout = vm1.layout
    add_odd_files(layout.vmdir)
    xb.write_config(FILES_CONFIG.format(cfg=layout.config))
    before = metadata(layout.vmdir)
    first = domid("vm1")

    run = xb.start()  # a live backup: the guest keeps running
    assert run.returncode == 0, journal.text("-u", "xenbackup@vm1")
    assert domid("vm1") == first

    with open(layout.image, "r+b") as f:  # the guest would now boot a different marker
        f.write(b"XBMARKER damaged\n")
    sh("rm", "-rf", str(layout.vmdir / "odd dir ü"), str(layout.vmdir / "hard1"))
    (layout.vmdir / "owned.txt").write_text("changed\n")
    offset = xen.console_log("vm1").stat().st_size

    restore = sh("xenbackup", "restore", "vm1", "--stop", check=False, timeout=900)
    assert restore.returncode == 0, restore.stderr + journal.text("-u", "xenbackup@vm1")

    assert metadata(layout.vmdir) == before
    phases = [e.get("XENBACKUP_PHASE") for e in journal.entries("SYSLOG_IDENTIFIER=xenbackup")]
    assert phases.index("restore-stop") < phases.index("restore-files") < phases.index("restore-start")
    second = domid("vm1")
    assert second != first, "the guest was not restarted"
    text = console_since("vm1", offset, layout.marker)
    assert "XBMARKER damaged" not in text


def test_restore_of_a_running_guest_without_stop_changes_nothing(vm1: SeedVm, xb: Xb, journal: Journal) -> None:
    layout = vm1.layout
    xb.write_config(FILES_CONFIG.format(cfg=layout.config))
    assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")
    (layout.vmdir / "new-after-backup.txt").write_text("keep me\n")
    before = metadata(layout.vmdir)
    first = domid("vm1")
    refused = sh("xenbackup", "restore", "vm1", check=False)
    assert refused.returncode == 1
    assert "vm1 is running" in refused.stderr and "--stop" in refused.stderr
    assert metadata(layout.vmdir) == before and domid("vm1") == first


def device_sha256(device: str) -> str:
    # blkback bypasses dom0's page cache: read the device with O_DIRECT.
    dd = sh("sh", "-c", f"dd if={device} bs=1M iflag=direct status=none | sha256sum")
    return dd.stdout.split()[0]


def test_block_restore_brings_back_the_device_and_the_guest_boots(
    seed_layout, domu_initramfs: Path, xb: Xb, journal: Journal, tmp_path: Path
) -> None:
    sh("lvcreate", "--yes", "-L", "16M", "-n", "vm2disk", "system")
    sh("lvcreate", "--yes", "-L", "8M", "-n", "tiny", "system")
    device = "/dev/system/vm2disk"
    marker = f"XBMARKER vm2 {secrets.token_hex(8)}"
    block = tmp_path / "image"
    with open(block, "wb") as f:
        f.write((marker + "\n").encode().ljust(4096, b"\0"))
        f.write(os.urandom((16 << 20) - 4096))
    sh("dd", f"if={block}", f"of={device}", "bs=1M", "oflag=direct", "status=none")
    cfg = xen.DomU("vm2", xen.domu_kernel(), domu_initramfs, Path(device)).write_config(tmp_path / "vm2.cfg")
    xb.write_config(f"""
        [vm.vm2]
        domain_config = "{cfg}"
        snapshot_size = "16M"
        disks = [{{ lv = "system/vm2disk", mode = "block" }}]
    """)
    with xen.running(cfg, "vm2") as domain:
        assert domain.marker == marker
        sh("xl", "pause", "vm2")
        try:
            at_backup = device_sha256(device)
            run = xb.start("vm2")
            assert run.returncode == 0, journal.text("-u", "xenbackup@vm2")
        finally:
            sh("xl", "unpause", "vm2")
    # No block-mode disk's run can carry the domain config: the prepare step stored it before the snapshot,
    # in the restic run that checked the repository's key, as a snapshot of its own in the same run.
    (config_snap,) = xb.snapshots("vm:vm2", "mode:config")
    (disk_snap,) = xb.snapshots("vm:vm2", "mode:block")
    run_tag = [t for t in disk_snap["tags"] if t.startswith("run:")]
    assert run_tag and run_tag[0] in config_snap["tags"] and config_snap["paths"] == [str(cfg)]
    told = journal.text("XENBACKUP_VM=vm2")
    created = re.search(r"created \S+ \S* ?snapshot system/vm2disk", told)
    assert created and told.index(f"saved domain config {cfg}") < created.start(), told
    saved_config = cfg.read_bytes()
    tiny_before = device_sha256("/dev/system/tiny")
    small = sh("xenbackup", "restore", "vm2", "--to-lv", "system/tiny", check=False)
    assert small.returncode == 1 and "smaller than the image" in small.stderr
    assert device_sha256("/dev/system/tiny") == tiny_before

    sh("dd", "if=/dev/urandom", f"of={device}", "bs=1M", "count=16", "oflag=direct", "status=none")
    assert device_sha256(device) != at_backup
    cfg.write_text("# edited after the backup\n")
    restore = sh("xenbackup", "restore", "vm2", "--with-config", check=False, timeout=900)
    assert restore.returncode == 0, restore.stderr + journal.text("SYSLOG_IDENTIFIER=xenbackup")
    assert device_sha256(device) == at_backup
    assert cfg.read_bytes() == saved_config
    assert "verified: sha256" in journal.text("SYSLOG_IDENTIFIER=xenbackup")
    with xen.running(cfg, "vm2") as domain:
        assert domain.marker == marker
    sh("systemctl", "reset-failed", "xenbackup@vm2.service", check=False)


def test_to_flatten_and_include_on_a_deep_tree(seed_layout, xb: Xb, journal: Journal) -> None:
    deep = seed_layout.vmdir / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    for depth, directory in enumerate([seed_layout.vmdir / "a", seed_layout.vmdir / "a" / "b", deep]):
        (directory / f"level{depth}.dat").write_bytes(os.urandom(3000 + depth))
    xb.write_config(FILES_CONFIG.format(cfg=seed_layout.config))
    assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")
    origin = metadata(seed_layout.vmdir)

    full = Path("/srv/restore-full")
    assert sh("xenbackup", "restore", "vm1", "--to", str(full), check=False).returncode == 0
    assert metadata(full) == origin

    flat = Path("/srv/restore-flat")
    assert sh("xenbackup", "restore", "vm1", "--to", str(flat), "--flatten", "--include", "a", check=False
              ).returncode == 0
    assert sorted(os.listdir(flat)) == ["level0.dat", "level1.dat", "level2.dat"]
    assert (flat / "level2.dat").read_bytes() == (deep / "level2.dat").read_bytes()

    part = Path("/srv/restore-part")
    assert sh("xenbackup", "restore", "vm1", "--to", str(part), "--include", "a/b/c", check=False).returncode == 0
    assert [str(p.relative_to(part)) for p in sorted(part.rglob("*"))] == [
        "a", "a/b", "a/b/c", "a/b/c/d", "a/b/c/d/level2.dat"]

    escape = sh("xenbackup", "restore", "vm1", "--to", "/srv/x", "--include", "../../etc", check=False)
    assert escape.returncode == 1 and "escapes the restored tree" in escape.stderr
    inside_repo = sh("xenbackup", "restore", "vm1", "--to", "/var/lib/xenbackup/repo/x", check=False)
    assert inside_repo.returncode == 1 and "inside the backup repository" in inside_repo.stderr
    assert not Path("/srv/x").exists() and not Path("/var/lib/xenbackup/repo/x").exists()
    unknown_vm = sh("xenbackup", "restore", "vm9", "--to", "/srv/x", check=False)
    assert unknown_vm.returncode == 2 and "vm.vm9: no such VM" in unknown_vm.stderr
    unknown_id = sh("xenbackup", "restore", "vm1", "--snapshot", "deadbeef", "--to", "/srv/x", check=False)
    assert unknown_id.returncode == 1 and "no backup of this VM has snapshot or run ID 'deadbeef'" in unknown_id.stderr
    assert not Path("/srv/x").exists()
