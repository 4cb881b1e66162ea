"""`xenbackup restore --delete` and `--with-config` on real LVM and restic: the bytes that come back."""

from __future__ import annotations

from pathlib import Path

from vmlib.product import Journal, Xb, our_mounts, our_snapshots, sh, sha256_file, tree_hashes

DOMAIN_CONFIG = Path("/etc/xenbackup-test/vm1.cfg")
CONFIG = f"""
[vm.vm1]
hypervisor = "none"
domain_config = "{DOMAIN_CONFIG}"
snapshot_size = "256M"
disks = [{{ lv = "system/xenvm", mode = "files", path = "vm1" }}]
"""


def back_up(xb: Xb, journal: Journal) -> None:
    xb.write_config(CONFIG)
    assert xb.start().returncode == 0, journal.text("-u", "xenbackup@vm1")
    assert our_snapshots() == [] and our_mounts() == []


def damage(vmdir: Path) -> None:
    """What an admin restores from: a changed file, a deleted one, and files the backup never saw."""
    with open(vmdir / "disk.img", "r+b") as f:
        f.seek(4096)
        f.write(b"\xff" * 8192)
    (vmdir / "vmlinuz").unlink()
    (vmdir / "stray.txt").write_text("written after the backup\n")
    (vmdir / "later" / "deeper").mkdir(parents=True, exist_ok=True)
    (vmdir / "later" / "deeper" / "new.bin").write_bytes(b"\x00\x01" * 4096)


def test_restore_delete_leaves_exactly_the_backed_up_tree(seed_layout, xb: Xb, journal: Journal) -> None:
    DOMAIN_CONFIG.parent.mkdir(parents=True, exist_ok=True)
    DOMAIN_CONFIG.write_text("name = 'vm1'\n")
    back_up(xb, journal)
    vmdir = seed_layout.vmdir
    assert tree_hashes(vmdir) == seed_layout.files

    damage(vmdir)
    out = sh("xenbackup", "restore", "vm1", check=False)
    assert out.returncode == 0, out.stderr
    # Without --delete, every backed-up file is back byte for byte and the newer files stay.
    after = tree_hashes(vmdir)
    assert {k: after[k] for k in seed_layout.files} == seed_layout.files
    assert set(after) - set(seed_layout.files) == {"stray.txt", "later/deeper/new.bin"}

    damage(vmdir)
    out = sh("xenbackup", "restore", "vm1", "--delete", check=False)
    assert out.returncode == 0, out.stderr
    assert tree_hashes(vmdir) == seed_layout.files
    assert not (vmdir / "later").exists(), "an empty directory the backup never had is left"
    assert "deleted 4 entries not in the backup" in journal.text("-t", "xenbackup")


def test_restore_with_config_brings_back_the_saved_domain_config(seed_layout, xb: Xb, journal: Journal) -> None:
    DOMAIN_CONFIG.parent.mkdir(parents=True, exist_ok=True)
    DOMAIN_CONFIG.write_bytes(b"name = 'vm1'\nmemory = 256\ndisk = ['phy:/dev/system/xenvm,xvda,w']\n")
    saved = sha256_file(DOMAIN_CONFIG)
    back_up(xb, journal)
    # Saved in the disk's own restic run (tag config:inside), not in a restic snapshot of its own.
    assert xb.snapshots("vm:vm1", "mode:config") == []
    assert len(xb.snapshots("vm:vm1", "config:inside")) == 1

    DOMAIN_CONFIG.write_bytes(b"name = 'vm1'\nmemory = 4096\n# edited after the backup\n")
    out = sh("xenbackup", "restore", "vm1", check=False)
    assert out.returncode == 0, out.stderr
    assert sha256_file(DOMAIN_CONFIG) != saved, "the domain config was restored without --with-config"

    out = sh("xenbackup", "restore", "vm1", "--with-config", check=False)
    assert out.returncode == 0, out.stderr
    assert sha256_file(DOMAIN_CONFIG) == saved
    assert tree_hashes(seed_layout.vmdir) == seed_layout.files
    assert not list(DOMAIN_CONFIG.parent.glob("*.xenbackup-restore")), "a staging file was left beside it"
