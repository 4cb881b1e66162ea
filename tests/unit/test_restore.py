from __future__ import annotations

import os
from pathlib import Path

import pytest

from xenbackup import config, names
from xenbackup.actions.context import Context
from xenbackup.actions.restore import (
    RestoreError,
    Restorer,
    RestoreRequest,
    flatten_into,
    merge_tree,
    normalize_include,
    select_run,
)
from xenbackup.repository import Snapshot


def snap(id_: str, time: str, run: str, disk: str, mode: str = "files") -> Snapshot:
    return Snapshot(id=id_ * 8, short_id=id_ * 2, time=time, hostname="h", paths=("/x",),
                    tags=("xenbackup", "vm:vm1", f"run:{run}", f"disk:{disk}", f"mode:{mode}"))


SNAPS = [
    snap("a", "2026-11-20T20:00:00Z", "r1", "system/xenvm"),
    snap("b", "2026-11-20T20:00:05Z", "r1", "config", "config"),
    snap("c", "2026-11-21T20:00:00Z", "r2", "system/xenvm"),
]


def test_latest_selects_the_newest_run_with_its_config() -> None:
    sel = select_run(SNAPS, "latest")
    assert sel.run_id == "r2" and list(sel.disks) == ["system/xenvm"] and sel.config is None


def test_snapshot_id_or_run_id_selects_the_whole_run() -> None:
    for wanted in ("aaaa", "r1", "bbbb"):
        sel = select_run(SNAPS, wanted)
        assert sel.run_id == "r1" and sel.config is not None and sel.disks["system/xenvm"].id.startswith("a")


def test_an_ambiguous_snapshot_prefix_lists_the_candidates() -> None:
    snaps = [*SNAPS, Snapshot(id="ab" + "0" * 62, short_id="ab000000", time="2026-11-22T20:00:00Z", hostname="h",
                              paths=("/x",), tags=("xenbackup", "vm:vm1", "run:r3", "disk:system/xenvm"))]
    with pytest.raises(RestoreError) as err:
        select_run(snaps, "a")
    assert str(err.value) == ("snapshot ID prefix 'a' is ambiguous, it matches: "
                              "aa (run r1, 2026-11-20T20:00:00Z, system/xenvm); "
                              "ab000000 (run r3, 2026-11-22T20:00:00Z, system/xenvm); "
                              "give more characters or the run ID")
    assert select_run(snaps, "ab").run_id == "r3"


def test_unknown_snapshot_is_a_clear_error() -> None:
    with pytest.raises(RestoreError, match="no backup of this VM has snapshot or run ID 'zzz'"):
        select_run(SNAPS, "zzz")
    with pytest.raises(RestoreError, match="no backup"):
        select_run([], "latest")


@pytest.mark.parametrize(("inc", "disk_path", "want"), [
    ("disk.img", "vm1", "/vm1/disk.img"),
    ("/vm1/sub/x", "vm1", "/vm1/sub/x"),
    ("sub/../x", "vm1", "/vm1/x"),
    ("etc/passwd", ".", "/etc/passwd"),
])
def test_includes_are_anchored_in_the_disk_tree(inc: str, disk_path: str, want: str) -> None:
    assert normalize_include(inc, disk_path) == want


@pytest.mark.parametrize("inc", ["../etc/shadow", "a/../../b", "/.."])
def test_includes_that_escape_are_refused(inc: str) -> None:
    with pytest.raises(RestoreError, match="escapes"):
        normalize_include(inc, "vm1")


def test_merge_overwrites_keeps_extras_and_hardlinks(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("new")
    os.link(src / "d" / "f", src / "link")
    os.symlink("d/f", src / "sym")
    (dst / "d").mkdir(parents=True)
    (dst / "d" / "f").write_text("old")
    (dst / "extra").write_text("keep me")
    (dst / "sym").mkdir()  # a directory where the backup has a symlink is replaced
    merge_tree(str(src), str(dst))
    assert (dst / "d" / "f").read_text() == "new" and (dst / "extra").read_text() == "keep me"
    assert os.stat(dst / "link").st_ino == os.stat(dst / "d" / "f").st_ino
    assert os.readlink(dst / "sym") == "d/f"


def test_flatten_moves_files_and_refuses_collisions(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "deep.img").write_text("1")
    (src / "top.cfg").write_text("2")
    assert flatten_into(str(src), str(tmp_path / "out")) == ["deep.img", "top.cfg"]
    assert sorted(os.listdir(tmp_path / "out")) == ["deep.img", "top.cfg"]
    (src / "x").mkdir()
    (src / "y").mkdir()
    (src / "x" / "same").write_text("1")
    (src / "y" / "same").write_text("2")
    with pytest.raises(RestoreError, match="'same' exists in two directories"):
        flatten_into(str(src), str(tmp_path / "out2"))


@pytest.fixture
def backed_up(tmp_path: Path, write_config):
    """A real restic repository holding one files-mode run of vm1, made the way the backup step makes it."""
    cfg_path = write_config(f"""
        [repository]
        url = "{tmp_path}/repo"
        password_file = "{tmp_path}/pw"
        [settings]
        runtime_dir = "{tmp_path}/run"
        state_dir = "{tmp_path}/state"
        [vm.vm1]
        hypervisor = "none"
        disks = [{{ lv = "system/xenvm", mode = "files", path = "vm1" }}]
    """)
    cfg = config.load(str(cfg_path))
    ctx = Context.from_config(cfg)
    mnt = tmp_path / "mnt"
    tree = mnt / "vm1" / "a" / "b"
    tree.mkdir(parents=True)
    (tree / "disk.img").write_bytes(os.urandom(10000))
    (mnt / "vm1" / "vm1.cfg").write_text("memory = 256\n")
    (mnt / "vm1" / "name with space\nand newline").write_text("odd")
    ctx.restic.ensure_initialized()
    ctx.restic.backup(["vm1"], names.restic_tags(ctx.host, "vm1", "system/xenvm", "files", "r1"), ctx.host,
                      lambda p: None, cwd=str(mnt))
    return ctx, cfg, mnt / "vm1"


def test_restore_to_path_reproduces_the_tree(backed_up, tmp_path: Path) -> None:
    ctx, cfg, origin = backed_up
    target = tmp_path / "restored"
    out = Restorer(ctx, cfg.vm("vm1"), RestoreRequest(vm="vm1", to_path=str(target))).run()
    assert out.restored == [str(target)]
    for rel in ("a/b/disk.img", "vm1.cfg", "name with space\nand newline"):
        assert (target / rel).read_bytes() == (origin / rel).read_bytes()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".xenbackup-restore-")]


def test_restore_flatten_and_include(backed_up, tmp_path: Path) -> None:
    ctx, cfg, origin = backed_up
    target = tmp_path / "flat"
    Restorer(ctx, cfg.vm("vm1"), RestoreRequest(vm="vm1", to_path=str(target), flatten=True,
                                                includes=("a",))).run()
    assert os.listdir(target) == ["disk.img"]
    assert (target / "disk.img").read_bytes() == (origin / "a/b/disk.img").read_bytes()


def test_restore_into_the_repository_is_refused(backed_up, tmp_path: Path) -> None:
    ctx, cfg, _ = backed_up
    with pytest.raises(RestoreError, match="inside the backup repository"):
        Restorer(ctx, cfg.vm("vm1"), RestoreRequest(vm="vm1", to_path=str(tmp_path / "repo" / "x"))).run()
    assert not (tmp_path / "repo" / "x").exists()


def test_dry_run_changes_nothing(backed_up, tmp_path: Path) -> None:
    ctx, cfg, _ = backed_up
    said: list[str] = []
    Restorer(ctx, cfg.vm("vm1"), RestoreRequest(vm="vm1", to_path=str(tmp_path / "t"), dry_run=True),
             say=said.append).run()
    assert not (tmp_path / "t").exists()
    assert any(line.startswith("[restore-files] restic restore") for line in said)


@pytest.mark.parametrize(("disk_path", "config_path", "rides"), [
    ("vm1", "/etc/xen/vm1.cfg", True),
    ("srv/vm1", "/etc/xen/vm1.cfg", True),
    (".", "/etc/xen/vm1.cfg", False),        # the whole filesystem: its own etc/ would collide
    ("etc/vm1", "/etc/xen/vm1.cfg", False),  # restic would rename one of the two etc/ trees
    ("vm1", "relative.cfg", False),
])
def test_the_config_rides_along_only_where_restic_keeps_its_path(disk_path: str, config_path: str,
                                                                 rides: bool) -> None:
    assert names.config_rides_along(disk_path, config_path) is rides


def test_the_domain_config_is_stored_in_the_disk_s_restic_run_and_restored_from_it(tmp_path: Path,
                                                                                  write_config) -> None:
    from xenbackup.actions import backup
    from xenbackup.model import LvRef, SnapshotRecord
    from xenbackup.state import Owner, RunState

    domain_config = tmp_path / "xen" / "vm1.cfg"
    domain_config.parent.mkdir()
    domain_config.write_bytes(b"name = 'vm1'\ndisk = ['phy:/dev/system/xenvm,xvda,w']\n")
    cfg = config.load(str(write_config(f"""
        [repository]
        url = "{tmp_path}/repo"
        password_file = "{tmp_path}/pw"
        [settings]
        runtime_dir = "{tmp_path}/run"
        state_dir = "{tmp_path}/state"
        [vm.vm1]
        hypervisor = "none"
        domain_config = "{domain_config}"
        disks = [{{ lv = "system/xenvm", mode = "files", path = "vm1" }}]
    """)))
    ctx = Context.from_config(cfg)
    ctx.restic.ensure_initialized()
    mnt = tmp_path / "mnt"
    (mnt / "vm1").mkdir(parents=True)
    (mnt / "vm1" / "disk.img").write_bytes(os.urandom(5000))
    state = RunState(vm="vm1", run_id="r2", owner=Owner.current(), started=0.0, snapshots=(
        SnapshotRecord(LvRef("system", "xenvm"), "xenvm.xb-vm1-1", "system-xenvm", mountpoint=str(mnt)),))

    state, alone = backup._store_all(ctx, cfg.vm("vm1"), state, backup._Current())
    assert alone is None
    ctx.store.clear("vm1")  # the run is over: a restore may take the VM now

    (stored,) = ctx.restic.snapshots(names.restic_filter("vm1"), host=ctx.host)
    assert len(state.restic_snapshots) == 1 and stored.id.startswith(state.restic_snapshots[0])
    assert names.CONFIG_INSIDE in stored.tags and stored.tag_value("disk") == "system/xenvm"
    sel = select_run([stored], "latest")
    assert sel.config == stored and list(sel.disks) == ["system/xenvm"]

    saved = domain_config.read_bytes()
    domain_config.write_bytes(b"# edited after the backup\n")
    Restorer(ctx, cfg.vm("vm1"), RestoreRequest(vm="vm1", with_config=True)).restore_config(sel.config,
                                                                                            str(domain_config))
    assert domain_config.read_bytes() == saved
    # The disk's own restore brings back its tree only, not the config beside it.
    target = tmp_path / "restored"
    Restorer(ctx, cfg.vm("vm1"), RestoreRequest(vm="vm1", to_path=str(target))).run()
    assert sorted(os.listdir(target)) == ["disk.img"]


def test_an_old_run_with_a_config_snapshot_of_its_own_still_restores_its_config(backed_up, tmp_path: Path) -> None:
    ctx, cfg, _ = backed_up
    old_config = tmp_path / "old.cfg"
    old_config.write_bytes(b"name = 'vm1'\nmemory = 128\n")
    ctx.restic.backup([str(old_config)], names.restic_tags(ctx.host, "vm1", names.CONFIG_DISK, names.CONFIG_DISK,
                                                           "r1"), ctx.host, lambda p: None)
    sel = select_run(ctx.restic.snapshots(names.restic_filter("vm1"), host=ctx.host), "r1")
    assert sel.config is not None and sel.config.tag_value("mode") == names.CONFIG_DISK
    assert list(sel.disks) == ["system/xenvm"]
    saved = old_config.read_bytes()
    old_config.write_bytes(b"changed")
    Restorer(ctx, cfg.vm("vm1"), RestoreRequest(vm="vm1", with_config=True)).restore_config(sel.config,
                                                                                            str(old_config))
    assert old_config.read_bytes() == saved
