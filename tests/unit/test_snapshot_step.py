"""The snapshot step against fake xl and LVM tools at the process boundary, with a real restic repository:
the order of what touches the guest, and that a failure inside the window leaves nothing behind."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from xenbackup import config, names
from xenbackup.actions import backup
from xenbackup.actions.context import Context
from xenbackup.repository import RepositoryError
from xenbackup.state import RunState

LVS = {"report": [{"lv": [
    {"lv_name": n, "vg_name": "system", "lv_attr": "-wi-ao----", "lv_size": str(1 << 30), "origin": "",
     "origin_size": "", "snap_percent": "", "data_percent": "", "metadata_percent": "", "lv_tags": "",
     "pool_lv": "", "lv_path": f"/dev/system/{n}", "lv_kernel_major": "254", "lv_kernel_minor": str(i),
     "vg_size": str(8 << 30), "vg_free": str(6 << 30), "vg_extent_size": str(4 << 20)}
    for i, n in enumerate(("db1-root", "db1-data"))]}]}
VGS = {"report": [{"vg": [{"vg_name": "system", "vg_size": str(8 << 30), "vg_free": str(6 << 30),
                           "vg_extent_size": str(4 << 20)}]}]}


@pytest.fixture
def tools(tmp_path: Path) -> Path:
    """xl and the LVM tools as shell scripts that append to one journal of calls, in order."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls"
    (tmp_path / "lvs.json").write_text(json.dumps(LVS))
    (tmp_path / "vgs.json").write_text(json.dumps(VGS))
    scripts = {
        # db1 is running; `xl list` shows it paused once `xl pause` ran.
        "xl": f"""case "$1" in
  domid) echo 3 ;;
  list) printf 'Name ID Mem VCPUs State Time(s)\\ndb1 3 256 1 %s 1.0\\n' \
        "$( [ -e {tmp_path}/paused ] && echo --p--- || echo -b----)" ;;
  pause) touch {tmp_path}/paused ;;
  unpause) rm -f {tmp_path}/paused ;;
esac""",
        # No LV carries our tag: `lvs @tag` finds nothing to sweep.
        "lvs": f'case "$*" in *@*) echo \'{{"report": [{{"lv": []}}]}}\' ;; *) cat {tmp_path}/lvs.json ;; esac',
        "vgs": f'cat {tmp_path}/vgs.json',
        # The second lvcreate fails, as on a VG that ran out of room between preflight and the window.
        "lvcreate": f"""n=$(cat {tmp_path}/lvcreate.n 2>/dev/null || echo 0); n=$((n+1))
echo $n > {tmp_path}/lvcreate.n
[ -e {tmp_path}/paused ] && echo "guest paused" >> {calls}
[ $n -lt "$(cat {tmp_path}/fail-at 2>/dev/null || echo 99)" ] || {{ echo "  Insufficient free space" >&2; exit 5; }}""",
        "lvremove": "",
        "udevadm": "",
    }
    for name, body in scripts.items():
        p = bindir / name
        p.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n{body}\n')
        p.chmod(0o755)
    return tmp_path


def write_cfg(tmp_path: Path, extra: str = "", password: str = "") -> config.Config:
    bindir = tmp_path / "bin"
    pw = tmp_path / "password"
    if password:
        pw.write_text(password)
    text = f"""
[repository]
url = "{tmp_path / 'repo'}"
password_file = "{pw}"
cache_dir = "{tmp_path / 'cache'}"
[settings]
runtime_dir = "{tmp_path / 'run'}"
state_dir = "{tmp_path / 'state'}"
metrics_file = ""
[commands]
xl = "{bindir / 'xl'}"
lvs = "{bindir / 'lvs'}"
vgs = "{bindir / 'vgs'}"
lvcreate = "{bindir / 'lvcreate'}"
lvremove = "{bindir / 'lvremove'}"
udevadm = "{bindir / 'udevadm'}"
[vm.db1]
snapshot_size = "256M"
domain_config = "{tmp_path / 'db1.cfg'}"
disks = [{{ lv = "system/db1-root", mode = "block" }}, {{ lv = "system/db1-data", mode = "block" }}]
{extra}
"""
    path = tmp_path / "xenbackup.toml"
    path.write_text(text)
    return config.load(str(path))


def calls(tmp_path: Path) -> list[str]:
    return [line.split()[0] + " " + line.split()[1] if len(line.split()) > 1 else line
            for line in (tmp_path / "calls").read_text().splitlines()]


def test_both_snapshots_are_made_inside_one_pause(tools: Path) -> None:
    cfg = write_cfg(tools)
    ctx = Context.from_config(cfg)
    state = backup.step_snapshot(ctx, cfg.vm("db1"))
    seen = calls(tools)
    window = seen[seen.index("xl pause"):seen.index("xl unpause") + 1]
    assert [c for c in window if not c.startswith("xl list")] == [
        "xl pause", "lvcreate --snapshot", "guest paused", "lvcreate --snapshot", "guest paused", "xl unpause"]
    # Nothing but snapshot creation inside the window: lvs/vgs ran before it.
    assert all(c.split()[0] not in ("lvs", "vgs") for c in window)
    # One `lvs` (each scans every PV) answered for the sweep, both origins and the VG's free space.
    assert [c for c in seen if c.split()[0] in ("lvs", "vgs")] == ["lvs --reportformat"]
    assert state.consistency == "pause" and state.paused == "" and state.pause_seconds is not None
    assert [d.source for d in state.disks] == ["config", "config"]
    assert not (tools / "paused").exists()


def test_lvcreate_failing_on_the_second_disk_unpauses_and_removes_the_first(tools: Path) -> None:
    (tools / "fail-at").write_text("2")
    cfg = write_cfg(tools)
    ctx = Context.from_config(cfg)
    with pytest.raises(Exception, match="Insufficient free space"):
        backup.step_snapshot(ctx, cfg.vm("db1"))
    seen = calls(tools)
    tail = seen[seen.index("xl pause"):]
    # The guest runs again first; removing the snapshot can take its time after that.
    assert [c for c in tail if not c.startswith("xl list") and c != "guest paused"] == [
        "xl pause", "lvcreate --snapshot", "lvcreate --snapshot", "xl unpause", "lvremove --yes"]
    assert not (tools / "paused").exists(), "the guest was left paused"
    assert "system/db1-root.xb-db1" in (tools / "calls").read_text().split("lvremove --yes ")[1]


def test_consistency_none_never_touches_the_guest(tools: Path) -> None:
    cfg = write_cfg(tools, 'consistency = "none"')
    backup.step_snapshot(Context.from_config(cfg), cfg.vm("db1"))
    assert not any(c.startswith(("xl pause", "xl unpause")) for c in calls(tools))


@pytest.mark.parametrize("monitored", [False, True])
def test_the_host_s_dmeventd_setting_reaches_every_classic_lvcreate(tools: Path, monitored: bool) -> None:
    write_cfg(tools)
    path = tools / "xenbackup.toml"
    setting = f"dmeventd_monitoring = {str(monitored).lower()}"
    path.write_text(path.read_text().replace("[settings]\n", f"[settings]\n{setting}\n"))
    cfg = config.load(str(path))
    (tools / "calls").write_text("")
    backup.step_snapshot(Context.from_config(cfg), cfg.vm("db1"))
    creates = [c for c in (tools / "calls").read_text().splitlines() if c.startswith("lvcreate")]
    assert len(creates) == 2
    assert all(("--monitor n" in c) is not monitored for c in creates), creates


def test_a_wrong_repository_password_fails_before_lvm(tools: Path) -> None:
    cfg = write_cfg(tools, password="right\n")
    ctx = Context.from_config(cfg)
    ctx.restic.init()
    (tools / "password").write_text("wrong\n")
    (tools / "calls").write_text("")
    with pytest.raises(RepositoryError, match="wrong password"):
        backup.step_snapshot(ctx, cfg.vm("db1"))
    assert not any(c.startswith(("lvcreate", "xl pause")) for c in calls(tools))


def test_restic_opens_the_repository_while_lvm_scans_not_after(tools: Path) -> None:
    """The key check that lvcreate waits for starts before the run's first `lvs`: restic's key derivation and
    its cold start then overlap LVM's scan instead of following it."""
    import shutil

    cfg = write_cfg(tools, password="secret\n")
    Context.from_config(cfg).restic.init()
    wrapper = tools / "bin" / "restic"
    wrapper.write_text(f'#!/bin/sh\ntouch {tools / "restic-started"}\nexec {shutil.which("restic")} "$@"\n')
    wrapper.chmod(0o755)
    lvs = tools / "bin" / "lvs"
    # The overview's lvs waits up to 5 s for restic to have started, and notes whether it had.
    lvs.write_text(lvs.read_text().replace("\n", f"""
case "$*" in *@*) ;; *) i=0; while [ ! -e {tools}/restic-started ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  [ -e {tools}/restic-started ] && echo restic >> {tools}/first || echo lvs >> {tools}/first ;; esac
""", 1))
    text = (tools / "xenbackup.toml").read_text().replace("[commands]\n", f'[commands]\nrestic = "{wrapper}"\n')
    (tools / "xenbackup.toml").write_text(text)
    cfg = config.load(str(tools / "xenbackup.toml"))
    backup.step_snapshot(Context.from_config(cfg), cfg.vm("db1"))
    assert (tools / "first").read_text().split() == ["restic"]
    assert any(c.startswith("lvcreate") for c in calls(tools))


def test_vms_starting_at_once_on_a_new_host_create_one_repository_and_one_password(tools: Path) -> None:
    """Each unit checks the repository before LVM, now beside its `lvs`: units of several VMs starting at
    once on a new host would each create the local repository and its password, and spoil both."""
    import shutil
    import threading

    cfg = write_cfg(tools)  # no password file and no repository yet
    wrapper = tools / "bin" / "restic"
    # `restic init` takes its time, as it does under emulation: long enough for the others to arrive.
    wrapper.write_text(f'#!/bin/sh\ncase " $* " in *" init "*) echo init >> {tools / "inits"}; sleep 1 ;; esac\n'
                       f'exec {shutil.which("restic")} "$@"\n')
    wrapper.chmod(0o755)
    text = (tools / "xenbackup.toml").read_text().replace("[commands]\n", f'[commands]\nrestic = "{wrapper}"\n')
    (tools / "xenbackup.toml").write_text(text)
    cfg = config.load(str(tools / "xenbackup.toml"))
    errors: list[BaseException] = []

    def unit() -> None:
        try:
            backup.open_repository(Context.from_config(cfg))
        except BaseException as exc:
            errors.append(exc)

    units = [threading.Thread(target=unit) for _ in range(3)]
    for t in units:
        t.start()
    for t in units:
        t.join(timeout=120)
    assert errors == []
    assert (tools / "inits").read_text().split() == ["init"]
    ctx = Context.from_config(cfg)
    ctx.restic.ensure_initialized()  # the one password opens the one repository


def test_a_missing_origin_is_reported_even_when_the_password_is_wrong_too(tools: Path) -> None:
    """The repository is opened while the origins are checked; the origin's error is the step's."""
    (tools / "lvs.json").write_text(json.dumps({"report": [{"lv": []}]}))
    cfg = write_cfg(tools, password="right\n")
    ctx = Context.from_config(cfg)
    ctx.restic.init()
    (tools / "password").write_text("wrong\n")
    with pytest.raises(backup.StepError, match="does not exist"):
        backup.step_snapshot(ctx, cfg.vm("db1"))
    (tools / "lvs.json").write_text(json.dumps(LVS))
    with pytest.raises(RepositoryError, match="wrong password"):
        backup.step_snapshot(ctx, cfg.vm("db1"))
    assert not any(c.startswith(("lvcreate", "xl pause")) for c in calls(tools))


def image_discovered_by_xl(tools: Path) -> None:
    """db1's domain definition, from a fake `xl -N create`, names one image file. The image's filesystem
    stands for the LV: the fake lvs gives system/db1-root that filesystem's device number."""
    (tools / "bin" / "xl").write_text(
        f'#!/bin/sh\necho "xl $*" >> {tools / "calls"}\n'
        'case "$1" in domid) exit 1 ;; -N) cat ' + str(tools / "db1.json") + ' ;; esac\n')
    image = tools / "images" / "db1.img"
    image.parent.mkdir()
    image.write_bytes(b"\0" * 4096)
    (tools / "db1.json").write_text(json.dumps({"disks": [{"pdev_path": str(image), "vdev": "xvda"}]}))
    st = os.stat(image)
    rows = json.loads((tools / "lvs.json").read_text())
    rows["report"][0]["lv"][0].update(lv_kernel_major=str(os.major(st.st_dev)),
                                      lv_kernel_minor=str(os.minor(st.st_dev)))
    (tools / "lvs.json").write_text(json.dumps(rows))


def test_a_discovered_disk_another_vm_lists_is_refused_before_any_snapshot(tools: Path) -> None:
    """Two VMs that claim one LV: db1 discovers system/db1-data, which vm.other lists by hand."""
    image_discovered_by_xl(tools)
    write_cfg(tools, "")
    text = (tools / "xenbackup.toml").read_text().replace(
        'disks = [{ lv = "system/db1-root", mode = "block" }, { lv = "system/db1-data", mode = "block" }]', "")
    text += '\n[vm.other]\ndisks = [{ lv = "system/db1-root", mode = "block" }]\n'
    (tools / "xenbackup.toml").write_text(text)
    (tools / "db1.cfg").write_text("name = 'db1'\n")
    cfg = config.load(str(tools / "xenbackup.toml"))
    assert cfg.vm("db1").discovers_disks
    with pytest.raises(backup.StepError, match=r"system/db1-root \(xvda: .*/db1.img\) of db1 is configured as a "
                                               r"disk of vm.other too"):
        backup.step_snapshot(Context.from_config(cfg), cfg.vm("db1"))
    assert not any(c.startswith(("lvcreate", "xl pause")) for c in calls(tools))


def test_a_config_xl_rejects_fails_with_xl_s_own_words(tools: Path) -> None:
    (tools / "bin" / "xl").write_text(
        f'#!/bin/sh\necho "xl $*" >> {tools / "calls"}\n'
        'case "$1" in domid) exit 1 ;; -N) echo "Parsing config from $3" >&2; '
        'echo "$3:4: config parsing error near \\`disk\': syntax error" >&2; exit 1 ;; esac\n')
    write_cfg(tools)
    text = (tools / "xenbackup.toml").read_text().replace(
        'disks = [{ lv = "system/db1-root", mode = "block" }, { lv = "system/db1-data", mode = "block" }]', "")
    (tools / "xenbackup.toml").write_text(text)
    (tools / "db1.cfg").write_text("disk = [ oops\n")
    cfg = config.load(str(tools / "xenbackup.toml"))
    with pytest.raises(backup.StepError, match="config parsing error near"):
        backup.step_snapshot(Context.from_config(cfg), cfg.vm("db1"))
    assert not any(c.startswith(("lvcreate", "xl pause")) for c in calls(tools))


def test_the_snapshot_lifetime_runs_from_lvcreate_to_lvremove_and_is_a_metric(tools: Path, caplog) -> None:
    import time

    from xenbackup.actions.record import RunResult
    from xenbackup.actions.status import render_metrics

    cfg = write_cfg(tools, extra='consistency = "none"')
    ctx = Context.from_config(cfg)
    before = time.time()
    backup.step_snapshot(ctx, cfg.vm("db1"))
    time.sleep(0.5)
    caplog.set_level("INFO")
    assert backup.step_cleanup(ctx, cfg.vm("db1"), RunResult.SUCCESS) == 0
    elapsed = time.time() - before
    record = ctx.store.read_record("db1")
    assert record is not None and 0.5 <= record["snapshot_seconds"] <= elapsed
    logged = [r for r in caplog.records if "snapshot_seconds" in getattr(r, "fields", {})]
    # Once when the last lvremove returned, once more in the run's outcome.
    assert [float(r.fields["snapshot_seconds"]) for r in logged] == [round(record["snapshot_seconds"], 2)] * 2
    assert f'xenbackup_last_snapshot_seconds{{vm="db1"}} {float(record["snapshot_seconds"])!r}' in \
        render_metrics({"db1": record})


def test_cleanup_judges_its_own_snapshots_by_the_kernel_and_looks_for_leftovers_after_removing_them(
        tools: Path, monkeypatch) -> None:
    from xenbackup.actions.record import RunResult

    # dm-snapshot invalidated the first disk's snapshot after the watch's last look.
    dmsetup = tools / "bin" / "dmsetup"
    dmsetup.write_text(f'#!/bin/sh\necho "dmsetup $*" >> {tools / "calls"}\n'
                       'case "$2" in *db1--root*) echo "0 2097152 snapshot Invalid" ;;\n'
                       '*) echo "0 2097152 snapshot 16/524288 16" ;; esac\n')
    dmsetup.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools / 'bin'}:{os.environ['PATH']}")
    cfg = write_cfg(tools, extra='consistency = "none"')
    ctx = Context.from_config(cfg)
    backup.step_snapshot(ctx, cfg.vm("db1"))
    (tools / "calls").write_text("")
    assert backup.step_cleanup(ctx, cfg.vm("db1"), RunResult.SUCCESS) == 1
    seen = [c for c in calls(tools) if not c.startswith("restic")]
    assert seen == ["dmsetup status", "lvremove --yes", "lvremove --yes", "lvs --reportformat"]
    assert "db1--root" in (tools / "calls").read_text().splitlines()[0]
    assert ctx.store.read_record("db1")["result"] == "overflow"


def test_cleanup_s_verdict_says_why_the_step_failed(tools: Path, caplog) -> None:
    # A failing step's own error lines can reach journald after its process is gone, and then lack the unit's
    # name (journalctl -u misses them); cleanup, which runs later, repeats the reason in the verdict.
    from xenbackup.actions.record import RunResult

    cfg = write_cfg(tools, extra='consistency = "none"')
    ctx = Context.from_config(cfg)
    vm = cfg.vm("db1")
    backup.step_snapshot(ctx, vm)
    backup.note_failure(ctx, vm, RepositoryError("restic failed with exit code 1 on repository X: Fatal: gone"))
    backup.note_failure(ctx, vm, KeyboardInterrupt("SIGTERM"))  # the first reason is the one that counts
    caplog.set_level("INFO")
    assert backup.step_cleanup(ctx, vm, RunResult.EXIT_CODE) == 0
    verdict = [r for r in caplog.records if r.getMessage().startswith("backup of db1 failed")]
    assert [r.getMessage() for r in verdict] == [
        "backup of db1 failed (result=exit-code): restic failed with exit code 1 on repository X: Fatal: gone"]
    assert verdict[0].fields["error"] == "restic failed with exit code 1 on repository X: Fatal: gone"
    assert ctx.store.read_record("db1")["error"].endswith("Fatal: gone")
    # A new run starts without the old reason.
    backup.step_snapshot(ctx, vm)
    state = ctx.store.load("db1")
    assert state is not None and state.error == ""
    assert backup.step_cleanup(ctx, vm, RunResult.SUCCESS) == 0
    assert ctx.store.read_record("db1")["error"] == ""


def test_prepare_snapshots_and_readies_the_disks_in_one_call(tools: Path) -> None:
    """The unit's ExecStartPre=: one process takes the snapshots and waits for their device links."""
    cfg = write_cfg(tools)
    state = backup.step_prepare(Context.from_config(cfg), cfg.vm("db1"))
    seen = calls(tools)
    assert seen.index("udevadm wait") > max(i for i, c in enumerate(seen) if c == "lvcreate --snapshot")
    assert state.phase == "backup" and len(state.snapshots) == 2
    saved = Context.from_config(cfg).store.load("db1")
    assert saved is not None and saved.phase == "backup"


def files_vm(tools: Path, monkeypatch: pytest.MonkeyPatch, mount: str = "", password: str = "") -> config.Config:
    """vm.web1: one files-mode disk, with blkid, mount, umount and dmsetup as recorders on PATH."""
    bindir = tools / "bin"
    for name, body in {"blkid": "echo TYPE=xfs", "mount": mount, "umount": "",
                       "dmsetup": "echo '0 100 snapshot 16/2097152 16'"}.items():
        (bindir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {tools / "calls"}\n{body}\n')
        (bindir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ.get('PATH', '')}")
    lvs = json.loads((tools / "lvs.json").read_text())
    row = {**lvs["report"][0]["lv"][0], "lv_name": "web1-root", "lv_path": "/dev/system/web1-root"}
    (tools / "lvs.json").write_text(json.dumps({"report": [{"lv": [row]}]}))
    return write_cfg(tools, '[vm.web1]\nsnapshot_size = "256M"\nconsistency = "none"\n'
                            'disks = [{ lv = "system/web1-root", mode = "files", path = "." }]', password=password)


def test_prepare_whose_mount_fails_removes_the_snapshot(tools: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure in the mount half aborts the job, and the snapshot of the first half must not outlive it."""
    cfg = files_vm(tools, monkeypatch, mount="echo 'mount: wrong fs type' >&2; exit 32")
    with pytest.raises(Exception, match="wrong fs type"):
        backup.step_prepare(Context.from_config(cfg), cfg.vm("web1"))
    seen = calls(tools)
    assert seen.index("lvremove --yes") > seen.index("mount -t")
    assert "system/web1-root.xb-web1" in (tools / "calls").read_text().split("lvremove --yes ")[1]


def test_the_backup_step_removes_its_snapshots_once_stored_and_cleanup_finds_none(
        tools: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The snapshot's life ends when restic is done, not after cleanup's interpreter start."""
    from xenbackup.actions.record import RunResult

    # The fake mount leaves one file on the mount point, for restic to store.
    cfg = files_vm(tools, monkeypatch, mount='for t; do :; done; echo data > "$t/file"', password="secret\n")
    ctx = Context.from_config(cfg)
    vm = cfg.vm("web1")
    backup.step_prepare(ctx, vm)
    (tools / "calls").write_text("")
    state = backup.step_backup(ctx, vm)
    seen = calls(tools)
    # The overflow watch's last look (after restic) comes before the removal; no second look is needed.
    looks = [c for c in seen if c.split()[0] in ("dmsetup", "lvremove")]
    assert looks[-2:] == ["dmsetup status", "lvremove --yes"] and looks.count("lvremove --yes") == 1
    assert state.snapshots == () and state.snapshot_seconds is not None and len(state.restic_snapshots) == 1
    (tools / "calls").write_text("")
    assert backup.step_cleanup(ctx, vm, RunResult.SUCCESS) == 0
    # Nothing of a finished run is left for cleanup to spawn LVM for.
    assert not (tools / "calls").read_text()
    record = ctx.store.read_record("web1")
    assert record is not None and record["result"] == "success"
    assert record["snapshot_seconds"] == state.snapshot_seconds


def test_an_overflow_that_unmounted_the_snapshot_before_restic_is_reported_as_the_overflow(
        tools: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dmeventd unmounts a snapshot the kernel invalidated: the step then fails on the missing tree, and that
    must still be recorded as the overflow it is, with its peak fill, not as some other failure."""
    import shutil

    from xenbackup.actions.record import RunResult
    from xenbackup.actions.watch import SnapshotOverflowed

    cfg = files_vm(tools, monkeypatch, mount='for t; do :; done; echo data > "$t/file"', password="secret\n")
    ctx = Context.from_config(cfg)
    vm = cfg.vm("web1")
    state = backup.step_prepare(ctx, vm)
    (tools / "bin" / "dmsetup").write_text(f'#!/bin/sh\necho "dmsetup $*" >> {tools / "calls"}\n'
                                           "echo '0 100 snapshot Invalid'\n")
    shutil.rmtree(state.snapshots[0].mountpoint)
    with pytest.raises(SnapshotOverflowed, match="overflowed during the backup"):
        backup.step_backup(ctx, vm)
    saved = ctx.store.load("web1")
    assert saved is not None and saved.overflowed and saved.peak_fill == 100.0
    assert backup.step_cleanup(ctx, vm, RunResult.EXIT_CODE) == 1
    record = ctx.store.read_record("web1")
    assert record is not None and record["result"] == "overflow" and record["peak_fill"] == 100.0


def test_a_snapshot_still_busy_after_the_backup_is_left_to_cleanup_and_the_backup_stands(
        tools: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backup step's early removal failing must not fail the stored backup: cleanup retries and judges."""
    from xenbackup.actions.record import RunResult

    cfg = files_vm(tools, monkeypatch, mount='for t; do :; done; echo data > "$t/file"', password="secret\n")
    ctx = Context.from_config(cfg)
    ctx.lvm.sleep = lambda seconds: None  # lvremove's retries, without their waits
    vm = cfg.vm("web1")
    backup.step_prepare(ctx, vm)
    (tools / "bin" / "lvremove").write_text(
        f'#!/bin/sh\necho "lvremove $*" >> {tools / "calls"}\n'
        'echo "  Logical volume system/web1-root.xb-web1 in use." >&2; exit 5\n')
    state = backup.step_backup(ctx, vm)
    assert len(state.snapshots) == 1 and len(state.restic_snapshots) == 1
    assert backup.step_cleanup(ctx, vm, RunResult.SUCCESS) == 1
    record = ctx.store.read_record("web1")
    assert record is not None and record["result"] == "cleanup-failed"

    kept = ctx.restic.snapshots(names.restic_filter("web1"))
    assert [s.id[:8] for s in kept] == list(state.restic_snapshots), "the stored backup was forgotten"


def step_in_fresh_interpreter(tools: Path, probe_text: str, step: str, **env: str) -> set[str]:
    """Run `xenbackup step STEP web1` as the unit does, in a fresh interpreter with `probe_text` wrapped
    around cli.main; returns the modules the probe wrote down."""
    import subprocess
    import sys

    probe, seen = tools / "probe.py", tools / "modules.json"
    probe.write_text(probe_text)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"), **env}
    # -S: what site imports differs by host (a .pth may load shutil); the probe answers for our imports only.
    done = subprocess.run([sys.executable, "-S", str(probe), str(seen), "--config", str(tools / "xenbackup.toml"),
                           "step", step, "web1"], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    return set(json.loads(seen.read_text()))


# Notes every module loaded at the moment restic's backup is spawned: what is imported before that lengthens
# the snapshot's life.
BEFORE_RESTIC_PROBE = """
import json, sys
before = set(sys.modules)  # the interpreter's own and site's: not ours to answer for
from xenbackup import cli
out = sys.argv.pop(1)
def hook(event, args):
    if event == "subprocess.Popen" and "backup" in list(args[1]) and not hook.seen:
        hook.seen = True
        with open(out, "w") as f:
            json.dump(sorted(set(sys.modules) - before), f)
hook.seen = False
sys.addaudithook(hook)
sys.exit(cli.main(sys.argv[1:]))
"""

# Code of the other steps, of other disk kinds, or for after restic's first line.
NOT_BEFORE_RESTIC = ("xenbackup.actions.record", "xenbackup.actions.status", "xenbackup.actions.sweep",
                     "xenbackup.actions.window", "xenbackup.actions.incremental", "xenbackup.thin",
                     "xenbackup.thinpool", "xenbackup.segfs", "xenbackup.discovery", "xenbackup.systemd",
                     "socket", "secrets", "urllib.parse", "shutil", "pystemd")


def test_the_backup_step_starts_restic_before_importing_what_it_does_not_need_for_that(
        tools: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")  # one run across two processes
    cfg = files_vm(tools, monkeypatch, mount='for t; do :; done; echo data > "$t/file"', password="secret\n")
    backup.step_prepare(Context.from_config(cfg), cfg.vm("web1"))
    loaded = step_in_fresh_interpreter(tools, BEFORE_RESTIC_PROBE, "backup")
    assert "xenbackup.repository" in loaded and "xenbackup.actions.watch" in loaded
    assert sorted(m for m in NOT_BEFORE_RESTIC if m in loaded) == []


AT_EXIT_PROBE = """
import json, sys
before = set(sys.modules)
from xenbackup import cli
out = sys.argv.pop(1)
rc = cli.main(sys.argv[1:])
with open(out, "w") as f:
    json.dump(sorted(set(sys.modules) - before), f)
sys.exit(rc)
"""


def test_cleanup_of_a_finished_run_loads_no_lvm_or_restic_code(tools: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It spawns nothing for LVM or the repository, so it pays for none of their modules either."""
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    cfg = files_vm(tools, monkeypatch, mount='for t; do :; done; echo data > "$t/file"', password="secret\n")
    ctx = Context.from_config(cfg)
    backup.step_prepare(ctx, cfg.vm("web1"))
    backup.step_backup(ctx, cfg.vm("web1"))
    (tools / "calls").write_text("")
    loaded = step_in_fresh_interpreter(tools, AT_EXIT_PROBE, "cleanup", SERVICE_RESULT="success")
    assert not (tools / "calls").read_text()
    assert "xenbackup.actions.record" in loaded
    assert sorted(m for m in ("xenbackup.lvm", "xenbackup.repository", "xenbackup.hypervisor",
                              "xenbackup.actions.watch", "xenbackup.progress") if m in loaded) == []
    record = ctx.store.read_record("web1")
    assert record is not None and record["result"] == "success"


INVOCATION = "0123456789abcdef0123456789abcdef"

CLEANUP_ENTRY_PROBE = """
import json, sys
before = set(sys.modules)
out = sys.argv.pop(1)
try:
    from xenbackup import entry
    entry.main()
finally:
    with open(out, "w") as f:
        json.dump(sorted(set(sys.modules) - before), f)
"""


def in_a_unit(tools: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The environment systemd gives each step of one invocation of xenbackup@web1.service."""
    runtime = tools / "run-xenbackup"
    runtime.mkdir()
    monkeypatch.setenv("INVOCATION_ID", INVOCATION)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))
    return runtime


def run_in_a_unit(tools: Path, monkeypatch: pytest.MonkeyPatch,
                  before: Callable[[Context], None] | None = None) -> tuple[Path, Context, RunState]:
    """web1's prepare and backup steps as one invocation of its unit runs them; `before` sees the context
    first. Returns the unit's runtime directory, the context and what the backup step returned."""
    runtime = in_a_unit(tools, monkeypatch)
    cfg = files_vm(tools, monkeypatch, mount='for t; do :; done; echo data > "$t/file"', password="secret\n")
    ctx = Context.from_config(cfg)
    if before is not None:
        before(ctx)
    backup.step_prepare(ctx, cfg.vm("web1"))
    return runtime, ctx, backup.step_backup(ctx, cfg.vm("web1"), finish=True)


def test_a_good_run_is_finished_by_its_backup_step_and_its_cleanup_step_loads_nothing(
        tools: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cleanup step of a good run costs an interpreter start, not an interpreter with the config loaded."""
    import subprocess
    import sys

    runtime, ctx, state = run_in_a_unit(tools, monkeypatch)
    record = ctx.store.read_record("web1")
    assert record is not None and record["result"] == "success" and record["run_id"] == state.run_id
    assert record["snapshot_seconds"] is not None and len(record["restic_snapshots"]) == 1
    assert ctx.store.load("web1") is None, "the run state outlived its finished run"
    marker = runtime / ".finished" / INVOCATION
    assert marker.read_text() == "web1\n"

    (tools / "calls").write_text("")
    seen = tools / "modules.json"
    probe = tools / "probe.py"
    probe.write_text(CLEANUP_ENTRY_PROBE)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"), "SERVICE_RESULT": "success",
           "EXIT_CODE": "exited", "EXIT_STATUS": "0", "XENBACKUP_CONFIG": str(tools / "xenbackup.toml")}
    done = subprocess.run([sys.executable, "-S", str(probe), str(seen), "step", "cleanup", "web1"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "the backup step of web1 finished the run" in done.stderr
    loaded = set(json.loads(seen.read_text()))
    assert sorted(m for m in loaded if m.startswith("xenbackup.")) == ["xenbackup.entry", "xenbackup.handoff"]
    assert not loaded & {"logging", "argparse", "tomllib", "dataclasses", "subprocess", "typing", "re"}
    assert not (tools / "calls").read_text() and not marker.exists()
    assert ctx.store.read_record("web1") == record


@pytest.mark.parametrize(("argv", "env", "marker"), [
    (["step", "cleanup", "web1"], {"SERVICE_RESULT": "exit-code"}, "web1"),   # the unit failed after all
    (["step", "cleanup", "web1"], {"SERVICE_RESULT": "signal"}, "web1"),
    (["step", "cleanup", "web1"], {"INVOCATION_ID": "f" * 32}, "web1"),       # another invocation's run
    (["step", "cleanup", "web2"], {}, "web1"),                                # another VM's run
    (["step", "cleanup", "web1"], {}, None),                                  # the backup step left it to us
    (["--debug", "step", "cleanup", "web1"], {}, "web1"),                     # not the unit's own command line
    (["step", "backup", "web1"], {}, "web1"),
    (["step", "cleanup", "web1"], {"RUNTIME_DIRECTORY": ""}, "web1"),         # not in a unit
    (["step", "cleanup", "web1"], {"INVOCATION_ID": "../../etc/passwd"}, "web1"),
])
def test_every_other_cleanup_takes_the_full_path(tmp_path: Path, argv: list[str], env: dict[str, str],
                                                 marker: str | None) -> None:
    from xenbackup import handoff

    environ = {"INVOCATION_ID": INVOCATION, "RUNTIME_DIRECTORY": str(tmp_path), "SERVICE_RESULT": "success"}
    if marker is not None:
        handoff.leave(marker, environ)
    assert handoff.taken(argv, {**environ, **env}) is None
    assert handoff.taken(["step", "cleanup", "web1"], environ) == (
        None if marker is None else
        "cleanup after result=success: the backup step of web1 finished the run; nothing left to release")
    assert list((tmp_path / ".finished").iterdir() if marker else []) == []


UNIT = Path(__file__).parents[2] / "units" / "xenbackup@.service"


def unit_stop_post(instance: str) -> list[str]:
    """The unit's ExecStopPost= as systemd runs it for `instance`: continuation lines joined, words split,
    `$$` and the specifiers resolved (an unknown specifier fails the test)."""
    import re
    import shlex

    text = UNIT.read_text().replace("\\\n", " ")
    (line,) = [entry for entry in text.splitlines() if entry.startswith("ExecStopPost=")]
    specifiers = {"i": instance, "%": "%"}
    return [re.sub(r"%(.)", lambda m: specifiers[m[1]], word).replace("$$", "$")
            for word in shlex.split(line.partition("=")[2])]


def run_stop_post(fake_bin: Any, instance: str, environ: dict[str, str]) -> tuple[str, str]:
    """Runs the unit's ExecStopPost= with a fake `xenbackup` (conftest's fake_bin) on PATH; returns what the
    line wrote to stderr and the command line `xenbackup` was started with ("" when it was not started)."""
    import subprocess

    fake_bin("xenbackup")
    fake_bin.calls.unlink(missing_ok=True)
    done = subprocess.run(unit_stop_post(instance), env={"PATH": f"{fake_bin.dir}:/usr/bin:/bin", **environ},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stderr, fake_bin.calls.read_text().strip() if fake_bin.calls.exists() else ""


def test_the_unit_confirms_a_finished_run_in_a_shell_without_starting_python(
        tools: Path, fake_bin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The marker the backup step leaves is read by the unit's own ExecStopPost= line, which then starts no
    interpreter at all."""
    runtime, ctx, _ = run_in_a_unit(tools, monkeypatch)
    record = ctx.store.read_record("web1")
    environ = {"INVOCATION_ID": INVOCATION, "RUNTIME_DIRECTORY": str(runtime), "SERVICE_RESULT": "success"}
    (tools / "calls").write_text("")
    stderr, called = run_stop_post(fake_bin, "web1", environ)
    assert stderr == "cleanup after result=success: the backup step of web1 finished the run; nothing left to release\n"
    assert called == "" and not (tools / "calls").read_text()
    assert list((runtime / ".finished").iterdir()) == []
    assert ctx.store.read_record("web1") == record


@pytest.mark.parametrize(("instance", "env", "marker"), [
    ("web1", {}, "web1"),                                  # the one case for the short path
    ("web1", {"SERVICE_RESULT": "exit-code"}, "web1"),     # the unit failed after all
    ("web1", {"SERVICE_RESULT": "signal"}, "web1"),
    ("web1", {"SERVICE_RESULT": "timeout"}, "web1"),
    ("web1", {"INVOCATION_ID": "f" * 32}, "web1"),         # another invocation's run
    ("web1", {"INVOCATION_ID": ""}, "web1"),
    ("web2", {}, "web1"),                                  # another VM's run
    ("web1", {}, "web1x"),
    ("web1", {}, None),                                    # the backup step left the run to cleanup
    ("web1", {"RUNTIME_DIRECTORY": ""}, "web1"),           # not in a unit
])
def test_the_unit_s_stop_line_and_the_cleanup_step_agree_on_when_a_run_is_finished(
        tmp_path: Path, fake_bin: Any, instance: str, env: dict[str, str], marker: str | None) -> None:
    """Every case but a good run's own marker starts `xenbackup step cleanup VM`, and the shell line takes
    the short path exactly when the step's own check (for a drop-in that runs the step itself) would."""
    from xenbackup import handoff

    environ = {"INVOCATION_ID": INVOCATION, "RUNTIME_DIRECTORY": str(tmp_path), "SERVICE_RESULT": "success"}
    finished = tmp_path / ".finished"
    if marker is not None:
        handoff.leave(marker, environ)
    stderr, called = run_stop_post(fake_bin, instance, {**environ, **env})
    short = called == ""
    assert short == (marker == instance and not env), (stderr, called)
    assert called in ("", f"xenbackup step cleanup {instance}")
    assert list(finished.iterdir() if finished.exists() else []) == ([] if short or marker is None
                                                                     else [finished / INVOCATION])
    if marker is not None:
        handoff.leave(marker, environ)
    assert (handoff.taken(["step", "cleanup", instance], {**environ, **env}) is not None) == short


def test_a_run_with_more_to_clean_up_is_left_to_the_cleanup_step(tools: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed run, cleanup also clears stale repository locks: the backup step does not finish it."""
    from xenbackup.actions.record import RunResult

    def failed_before(ctx: Context) -> None:
        ctx.store.write_record("web1", {"vm": "web1", "result": "failure"})

    runtime, ctx, state = run_in_a_unit(tools, monkeypatch, failed_before)
    vm = ctx.cfg.vm("web1")
    assert state.phase == "cleanup" and ctx.store.load("web1") is not None
    assert not (runtime / ".finished").exists()
    monkeypatch.setenv("SERVICE_RESULT", "success")
    assert backup.step_cleanup(ctx, vm) == 0
    record = ctx.store.read_record("web1")
    assert record is not None and record["result"] == RunResult.SUCCESS.value and ctx.store.load("web1") is None


def test_a_unit_that_failed_after_its_backup_step_finished_the_run_cleans_up_in_full(
        tools: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runtime, ctx, _ = run_in_a_unit(tools, monkeypatch)
    vm = ctx.cfg.vm("web1")
    assert (runtime / ".finished" / INVOCATION).exists()
    (tools / "calls").write_text("")
    monkeypatch.setenv("SERVICE_RESULT", "signal")
    assert backup.step_cleanup(ctx, vm) == 0
    assert not (runtime / ".finished" / INVOCATION).exists()
    assert "lvs" in (tools / "calls").read_text(), "the full cleanup did not look for leftovers"


def restic_logged(tools: Path) -> None:
    """restic behind a wrapper that adds each of its command lines to the journal of calls."""
    import shutil

    wrapper = tools / "bin" / "restic"
    wrapper.write_text(f'#!/bin/sh\necho "restic $*" >> {tools / "calls"}\nexec {shutil.which("restic")} "$@"\n')
    wrapper.chmod(0o755)
    text = (tools / "xenbackup.toml").read_text().replace("[commands]\n", f'[commands]\nrestic = "{wrapper}"\n')
    (tools / "xenbackup.toml").write_text(text)


def restic_commands(tools: Path) -> list[str]:
    """restic's commands that open the repository and LVM's calls, in order."""
    out = []
    for line in (tools / "calls").read_text().splitlines():
        words = line.split()
        if words[0] == "restic":
            sub = next(w for w in words[1:] if not w.startswith("-") and not w[0].isdigit())
            if sub != "version":
                out.append(f"restic {sub}" + (" config" if "disk:config" in words else ""))
        elif words[0] in ("lvcreate", "lvremove"):
            out.append(words[0])
    return out


def test_a_config_no_disk_can_carry_is_stored_by_the_key_check_before_any_snapshot(
        tools: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config that cannot ride in a disk's run (here a files-mode tree stored from its root, elsewhere
    block-mode disks only) is stored by the restic that checks the repository's key: one repository open for
    both, before the snapshot exists, and none after it."""
    cfg = files_vm(tools, monkeypatch, mount='for t; do :; done; echo data > "$t/file"', password="secret\n")
    Context.from_config(cfg).restic.init()
    domain = tools / "web1.cfg"
    domain.write_text("name = 'web1'\n")
    restic_logged(tools)
    text = (tools / "xenbackup.toml").read_text()
    (tools / "xenbackup.toml").write_text(
        text.replace('consistency = "none"\n', f'consistency = "none"\ndomain_config = "{domain}"\n'))
    cfg = config.load(str(tools / "xenbackup.toml"))
    ctx = Context.from_config(cfg)
    (tools / "calls").write_text("")
    backup.step_prepare(ctx, cfg.vm("web1"))
    assert restic_commands(tools) == ["restic backup config", "lvcreate"]
    (tools / "calls").write_text("")
    state = backup.step_backup(ctx, cfg.vm("web1"))
    assert restic_commands(tools) == ["restic backup", "lvremove"]
    assert state.config_first and len(state.restic_snapshots) == 2
    config_run = [s for s in ctx.restic.snapshots(names.restic_filter("web1")) if s.tag_value("mode") == "config"]
    assert [(s.paths, s.tag_value("run")) for s in config_run] == [((str(domain),), state.run_id)]
    assert config_run[0].id.startswith(state.restic_snapshots[0])
    # The next run's prepare step gets no `restic cat config` to start early: it stores the config instead.
    assert not (tools / "run" / ".headstart").exists() or not list((tools / "run" / ".headstart").iterdir())


def test_a_wrong_password_fails_the_config_s_store_before_lvm(tools: Path) -> None:
    cfg = write_cfg(tools, password="right\n")
    (tools / "db1.cfg").write_text("name = 'db1'\n")
    ctx = Context.from_config(cfg)
    ctx.restic.init()
    (tools / "password").write_text("wrong\n")
    (tools / "calls").write_text("")
    with pytest.raises(RepositoryError, match=r"cannot be opened or written: .*wrong password"):
        backup.step_snapshot(ctx, cfg.vm("db1"))
    assert not any(c.startswith(("lvcreate", "xl pause")) for c in calls(tools))
    (tools / "password").write_text("right\n")
    assert ctx.restic.snapshots() == []


def test_a_run_that_fails_after_storing_its_config_leaves_no_config_behind(tools: Path) -> None:
    """A config without its disks restores nothing and would count in the config's retention group."""
    from xenbackup.actions.record import RunResult

    cfg = write_cfg(tools, password="secret\n")
    (tools / "db1.cfg").write_text("name = 'db1'\n")
    ctx = Context.from_config(cfg)
    ctx.restic.init()
    (tools / "fail-at").write_text("1")
    with pytest.raises(Exception, match="Insufficient free space"):
        backup.step_snapshot(ctx, cfg.vm("db1"))
    state = ctx.store.load("db1")
    assert state is not None and state.config_first and len(state.restic_snapshots) == 1
    assert [s.tag_value("mode") for s in ctx.restic.snapshots()] == ["config"]
    backup.step_cleanup(ctx, cfg.vm("db1"), RunResult.EXIT_CODE)
    assert ctx.restic.snapshots() == []


def test_a_discovered_vm_s_config_no_disk_carried_is_stored_after_the_snapshots_are_gone(
        tools: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Which disks a discovered VM has is known only after the key check started; a config none of them can
    carry (here: the image's directory and the config share their first path component) gets a restic run of
    its own, which reads nothing from a snapshot and so comes after them."""
    files_vm(tools, monkeypatch)
    (tools / "lvs.json").write_text(json.dumps(LVS))
    image_discovered_by_xl(tools)
    (tools / "db1.cfg").write_text("name = 'db1'\n")
    write_cfg(tools, 'consistency = "none"', password="secret\n")
    text = (tools / "xenbackup.toml").read_text().replace(
        'disks = [{ lv = "system/db1-root", mode = "block" }, { lv = "system/db1-data", mode = "block" }]', "")
    (tools / "xenbackup.toml").write_text(text)
    restic_logged(tools)
    cfg = config.load(str(tools / "xenbackup.toml"))
    assert cfg.vm("db1").discovers_disks
    ctx = Context.from_config(cfg)
    ctx.restic.init()
    # The fake mount puts a file where the image's directory is in the LV's filesystem.
    where = Path(ctx.disks(cfg.vm("db1"), ctx.lvm.overview().volumes)[0].path)
    assert not names.config_rides_along(str(where), str(tools / "db1.cfg"))
    (tools / "bin" / "mount").write_text(f'#!/bin/sh\necho "mount $*" >> {tools / "calls"}\n'
                                         f'for t; do :; done; mkdir -p "$t/{where}"; echo data > "$t/{where}/file"\n')
    (tools / "calls").write_text("")
    backup.step_prepare(ctx, cfg.vm("db1"))
    state = backup.step_backup(ctx, cfg.vm("db1"))
    assert restic_commands(tools) == ["restic cat", "lvcreate", "restic backup", "lvremove", "restic backup config"]
    assert not state.config_first and len(state.restic_snapshots) == 2


BACKUP_ENTRY_PROBE = """
import json, sys
out = sys.argv.pop(1)
seen = {}


class Watch:
    # Notes, as the step's command line parser is imported, whether restic was already started.
    def find_spec(self, name, path=None, target=None):
        if name == "xenbackup.cli" and "held" not in seen:
            started = sys.modules.get("xenbackup.headstart")
            seen["held"] = [s.pid for s in started._held] if started else []
        return None


sys.meta_path.insert(0, Watch())
try:
    from xenbackup import entry
    entry.main()
finally:
    with open(out, "w") as f:
        json.dump(seen, f)
"""


def test_the_steps_start_restic_before_they_load_their_code(tools: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prepare step leaves the backup step its first restic command, without the secrets; the unit's
    backup step, a fresh interpreter, starts it before importing the rest of xenbackup and then runs that
    very process: one `restic backup`, and the run stored and finished. The backup step leaves the next
    prepare step its key check likewise."""
    import shutil
    import subprocess
    import sys

    real = shutil.which("restic")
    assert real is not None
    runtime = in_a_unit(tools, monkeypatch)
    cfg = files_vm(tools, monkeypatch, mount='for t; do :; done; echo data > "$t/file"', password="secret\n")
    wrapper = tools / "bin" / "restic"
    wrapper.write_text(f'#!/bin/sh\necho "restic $* pid=$$" >> {tools / "calls"}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    # Object storage keys come from an environment file: restic gets them, the file left behind does not.
    (tools / "s3.env").write_text("AWS_SECRET_ACCESS_KEY=hunter22\n")
    toml = tools / "xenbackup.toml"
    setting = f'environment_file = "{tools / "s3.env"}"\n'
    toml.write_text(toml.read_text().replace("[repository]\n", f"[repository]\n{setting}"))
    cfg = config.load(str(toml))
    ctx = Context.from_config(cfg)
    backup.step_prepare(ctx, cfg.vm("web1"))
    plan = runtime / ".headstart" / INVOCATION
    assert plan.stat().st_mode & 0o777 == 0o600
    assert b"secret" not in plan.read_bytes() and b"hunter22" not in plan.read_bytes()
    assert str(tools / "password").encode() in plan.read_bytes() and str(tools / "s3.env").encode() in plan.read_bytes()

    (tools / "calls").write_text("")
    seen = tools / "seen.json"
    probe = tools / "probe.py"
    probe.write_text(BACKUP_ENTRY_PROBE)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"),
           "XENBACKUP_CONFIG": str(tools / "xenbackup.toml")}
    done = subprocess.run([sys.executable, "-S", str(probe), str(seen), "step", "backup", "web1"], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    held = json.loads(seen.read_text())["held"]
    assert len(held) == 1, "restic was not started before the command line parser was imported"
    backups = [line for line in (tools / "calls").read_text().splitlines() if line.startswith("restic backup")]
    assert backups == [backups[0]] and backups[0].endswith(f"pid={held[0]}"), backups
    assert "was started" in done.stderr and "ahead" in done.stderr and "stopping it" not in done.stderr
    assert "hunter22" not in done.stderr
    assert not plan.exists()
    record = ctx.store.read_record("web1")
    assert record is not None and record["result"] == "success" and len(record["restic_snapshots"]) == 1
    stored = ctx.restic.snapshots(names.restic_filter("web1", run_id=record["run_id"]))
    assert [s.id[:8] for s in stored] == record["restic_snapshots"]

    # The backup step left the VM's next prepare step its key check, and that step, another invocation of
    # the unit, starts it before it loads its code and then takes that process for its key check.
    key_check = runtime / ".headstart" / "web1.prepare"
    assert key_check.stat().st_mode & 0o777 == 0o600 and b"hunter22" not in key_check.read_bytes()
    (tools / "calls").write_text("")
    done = subprocess.run([sys.executable, "-S", str(probe), str(seen), "step", "prepare", "web1"],
                          env={**env, "INVOCATION_ID": "f" * 32}, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    held = json.loads(seen.read_text())["held"]
    assert len(held) == 1, "restic was not started before the command line parser was imported"
    checks = [line for line in (tools / "calls").read_text().splitlines() if line.startswith("restic cat config")]
    assert checks == [checks[0]] and checks[0].endswith(f"pid={held[0]}"), checks
    assert "was started" in done.stderr and "did not use it" not in done.stderr
    assert "lvcreate" in (tools / "calls").read_text() and not key_check.exists()
