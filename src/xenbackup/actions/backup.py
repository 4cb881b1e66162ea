"""The backup lifecycle: snapshot → mount → back up → clean up, as idempotent steps."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any

from .. import hypervisor as hv_mod
from .. import journal
from ..config import Config
from ..discovery import DiscoveryError, SystemProbe, discover
from ..hypervisor import Hypervisor, HypervisorError
from ..journal import MessageId
from ..lvm import LogicalVolume, Lvm, LvmError, VolumeGroup
from ..model import VM, Consistency, Disk, DiskMode, HypervisorKind, PlannedCommand, SnapshotRecord, snapshot_name
from ..mount import Mounter, mount_options, mounts_below
from ..progress import Reporter
from ..repository import BackupSummary, RepositoryError, Restic, tags_for
from ..run import CommandError
from ..state import Busy, Owner, RunState, Slots, StateStore, new_run_id
from .status import write_metrics
from .watch import OverflowWatch, SnapshotOverflowed
from .window import PauseTooLong, ResumeFailed, choose, quiesced, resume_left

log = logging.getLogger(__name__)


class StepError(Exception):
    """A step failed for a reason worth one clear line in the journal."""


@dataclass
class Context:
    cfg: Config
    lvm: Lvm
    mounter: Mounter
    restic: Restic
    store: StateStore
    slots: Slots
    host: str

    @classmethod
    def from_config(cls, cfg: Config) -> Context:
        return cls(
            cfg=cfg,
            lvm=Lvm(cfg.commands),
            mounter=Mounter(cfg.commands),
            restic=Restic(cfg.repository, cfg.command("restic")),
            store=StateStore(cfg.settings.runtime_dir, cfg.settings.state_dir),
            slots=Slots(cfg.settings.runtime_dir, cfg.settings.max_parallel),
            host=cfg.repository.host or socket.gethostname(),
        )

    def hypervisor(self, vm: VM) -> Hypervisor:
        return hv_mod.for_vm(vm, self.cfg.commands)

    def disks(self, vm: VM) -> tuple[Disk, ...]:
        """The VM's disks: as configured, else read from its domain definition and mapped to LVs."""
        if not vm.discovers_disks:
            return vm.disks
        try:
            disks = discover(vm, self.hypervisor(vm), self.lvm, SystemProbe(self.cfg.command("losetup")))
        except (DiscoveryError, HypervisorError, LvmError) as exc:
            raise StepError(str(exc)) from None
        except CommandError as exc:
            raise StepError(f"cannot read the disks of {vm.name}: {exc}") from None
        for other in self.cfg.vms.values():
            claimed = {str(d.lv) for d in other.disks}
            for disk in disks:
                if other.name != vm.name and str(disk.lv) in claimed:
                    raise StepError(f"{disk.lv} ({disk.source}) of {vm.name} is configured as a disk of "
                                    f"vm.{other.name} too; one LV belongs to one VM")
        return disks


def _event(level: int, msg: str, message_id: MessageId, *args: object, **fields: object) -> None:
    log.log(level, msg, *args, extra={"message_id": message_id.value, "fields": fields})


# --- snapshot ---------------------------------------------------------------------------------

def sweep_stale(ctx: Context, vm: VM) -> list[str]:
    """Unmount and remove what an earlier crashed run of this VM left. Only tagged LVs are touched."""
    removed: list[str] = []
    for entry in mounts_below(ctx.store.mount_root(vm.name)):
        log.warning("unmounting leftover mount %s", entry.target)
        ctx.mounter.umount(entry.target)
    for lv in ctx.lvm.tagged(vm.lv_tag):
        ctx.lvm.remove(lv.ref, ctx.cfg.settings.lvremove_retries)
        removed.append(str(lv.ref))
        _event(logging.WARNING, "removed stale snapshot %s left by an earlier run", MessageId.STALE_REMOVED,
               lv.ref, snapshot=lv.ref)
    return removed


def sweep_all(ctx: Context) -> list[str]:
    """Boot-time sweep: every VM's leftovers, and tagged snapshots of VMs no longer configured."""
    removed: list[str] = []
    for vm in ctx.cfg.vms.values():
        with journal.context(vm=vm.name, phase="sweep"):
            try:
                with ctx.store.lock(vm.name, wait=False):
                    state = ctx.store.load(vm.name)
                    if state is not None and state.owner.alive():
                        continue
                    paused = state is not None and not _resume_left(ctx, vm, state)
                    left = sweep_stale(ctx, vm)
                    if left:
                        record_interrupted(ctx, vm, left)
                    removed += left
                    if not paused:
                        ctx.store.clear(vm.name)
            except Busy:
                log.info("a run of %s is in progress; not sweeping it", vm.name)
    known = {vm.lv_tag for vm in ctx.cfg.vms.values()}
    for lv in ctx.lvm.tagged("xenbackup"):
        vm_tags = [t for t in lv.tags if t.startswith("xenbackup-vm:")]
        if vm_tags and not known.intersection(vm_tags):
            ctx.lvm.remove(lv.ref, ctx.cfg.settings.lvremove_retries)
            removed.append(str(lv.ref))
            _event(logging.WARNING, "removed stale snapshot %s of an unconfigured VM", MessageId.STALE_REMOVED,
                   lv.ref, snapshot=lv.ref)
    # At boot the network may not be up; the next run clears a remote repository's locks anyway.
    if removed and ctx.cfg.repository.is_local:
        _clear_stale_locks(ctx)
    return removed


def _resume_left(ctx: Context, vm: VM, state: RunState) -> bool:
    """A run killed inside its snapshot window leaves the guest paused; it must never stay that way.

    False if the guest could not be resumed: the record of the pause is then kept, so the next cleanup,
    run or boot sweep tries again."""
    if not state.paused:
        return True
    try:
        resume_left(ctx.hypervisor(vm), vm.name, state.paused)
    except Exception as exc:
        log.critical("%s is still %s by an interrupted run and could not be resumed: %s; resume it by hand",
                     vm.name, "frozen" if state.paused == "freeze" else "paused", exc)
        return False
    ctx.store.save(replace(state, paused=""))
    return True


def _clear_stale_locks(ctx: Context) -> None:
    """A killed restic leaves its lock behind, which would block prune, check and restore."""
    try:
        ctx.restic.unlock_stale()
    except Exception as exc:
        log.warning("could not clear stale repository locks: %s", exc)


def record_interrupted(ctx: Context, vm: VM, left: list[str]) -> None:
    """A run that left its snapshots behind never finished: its VM's record (status, metrics) says so."""
    _save_record(ctx, vm, {
        "vm": vm.name, "result": "interrupted", "finished": time.time(), "run_id": "", "started": None,
        "duration": None, "peak_fill": None, "restic_snapshots": [], "stale_snapshots": left,
    })


def _save_record(ctx: Context, vm: VM, record: dict[str, Any]) -> None:
    """Write the VM's last-run record (keeping the time of the last success) and refresh the metrics."""
    previous = ctx.store.read_record(vm.name) or {}
    record["last_success"] = record["finished"] if record["result"] == "success" else previous.get("last_success")
    ctx.store.write_record(vm.name, record)
    try:
        write_metrics(ctx.cfg)
    except OSError as exc:
        log.warning("cannot write metrics file %s: %s", ctx.cfg.settings.metrics_file, exc)


def claim(ctx: Context, vm: VM) -> RunState:
    """Take ownership of the VM for a new run, clearing a dead run's leftovers first."""
    old = ctx.store.load(vm.name)
    me = Owner.current()
    if old is not None and old.owner != me and old.owner.alive():
        raise Busy(f"a backup of {vm.name} is already running ({old.owner.describe()}, run {old.run_id})")
    if old is not None:
        _resume_left(ctx, vm, old)
    sweep_stale(ctx, vm)
    state = RunState(vm=vm.name, run_id=new_run_id(), owner=me, started=time.time())
    ctx.store.save(state)
    return state


def preflight(ctx: Context, vm: VM, disks: tuple[Disk, ...]) -> dict[str, bool]:
    """Check every origin and the free space before creating anything. Returns thin-ness per disk."""
    problems: list[str] = []
    thin: dict[str, bool] = {}
    need: dict[str, int] = {}
    vgs: dict[str, VolumeGroup] = {}
    for disk in disks:
        lv = ctx.lvm.lv(disk.lv)
        if lv is None:
            problems.append(f"logical volume {disk.lv} does not exist")
            continue
        if lv.is_classic_snapshot or lv.origin:
            problems.append(f"{disk.lv} is itself a snapshot; configure its origin instead")
            continue
        thin[str(disk.lv)] = lv.is_thin
        if not lv.is_thin:
            if disk.lv.vg not in vgs:
                vgs[disk.lv.vg] = ctx.lvm.vg(disk.lv.vg)
            vg = vgs[disk.lv.vg]
            need[vg.name] = need.get(vg.name, 0) + vm.snapshot_size.bytes_needed(lv.size, vg.size, vg.free)
    for vg_name, needed in need.items():
        vg = vgs[vg_name]
        if needed > vg.free:
            problems.append(f"volume group {vg_name} has {vg.free} bytes free, but the snapshots of "
                            f"{vm.name} need {needed} ({vm.snapshot_size} each); free space or set a "
                            "smaller snapshot_size")
    if problems:
        raise StepError("; ".join(problems))
    return thin


def step_snapshot(ctx: Context, vm: VM) -> RunState:
    with journal.context(phase="snapshot"), ctx.store.lock(vm.name):
        state = claim(ctx, vm)
        _event(logging.INFO, "backup of %s started (run %s)", MessageId.STARTED, vm.name, state.run_id,
               run=state.run_id)
        ctx.slots.acquire(vm.name, state.owner)
        # Everything that can fail or take time happens before the guest is paused.
        disks = ctx.disks(vm)
        for disk in disks:
            if disk.source != "config":
                log.info("disk %s (%s mode) found in the domain definition: %s", disk.lv, disk.mode, disk.source)
        thin = preflight(ctx, vm, disks)
        # A run that cannot store anything (wrong password, repository gone) must never touch LVM.
        open_repository(ctx)
        hv = ctx.hypervisor(vm)
        method = choose(vm.consistency, vm.hypervisor, len(disks), lambda: hv.agent_answers(vm.name))
        if method is Consistency.FREEZE and not hv.agent_answers(vm.name):
            raise StepError(f"consistency = \"freeze\" but the qemu guest agent of {vm.name} does not answer")
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        tags = ["xenbackup", vm.lv_tag, f"xenbackup-run:{state.run_id}"]
        planned = [(disk, snapshot_name(vm.name, disk, stamp), thin[str(disk.lv)]) for disk in disks]
        state = replace(state, disks=disks, consistency=method.value)
        ctx.store.save(state)

        def record_pause(paused: str) -> None:
            nonlocal state
            state = replace(state, paused=paused)
            ctx.store.save(state)

        with ExitStack() as stack:
            try:
                with quiesced(hv, vm.name, method, vm.max_pause, record_pause) as window:
                    for disk, name, is_thin in planned:
                        ref = ctx.lvm.create_snapshot(disk.lv, name, None if is_thin else vm.snapshot_size, tags)
                        stack.callback(ctx.lvm.remove, ref, ctx.cfg.settings.lvremove_retries)
                        state = state.with_snapshot(SnapshotRecord(disk.lv, name, disk.slug, thin=is_thin))
                        ctx.store.save(state)
                        window.check()
                # The timer may have fired between the last check and the resume.
                window.check()
            except (PauseTooLong, ResumeFailed) as exc:
                if isinstance(exc, ResumeFailed):
                    stack.pop_all()  # the snapshots stay for cleanup, which retries the resume first
                raise StepError(str(exc)) from None
            stack.pop_all()
        if window.started:
            state = replace(state, pause_seconds=round(window.seconds, 3))
        for disk, name, is_thin in planned:
            log.info("created %s snapshot %s/%s of %s", "thin" if is_thin else f"{vm.snapshot_size}",
                     disk.lv.vg, name, disk.lv)
        state = replace(state, phase="mount")
        ctx.store.save(state)
        return state


# --- mount ------------------------------------------------------------------------------------

def _disk(vm: VM, state: RunState, slug: str) -> Disk:
    for d in state.disks or vm.disks:
        if d.slug == slug:
            return d
    raise StepError(f"run state names disk {slug}, which is no longer in the config of {vm.name}")


def _own_state(ctx: Context, vm: VM) -> RunState:
    state = ctx.store.load(vm.name)
    if state is None:
        raise StepError(f"no snapshot step has run for {vm.name} (no state in {ctx.store.vm_dir(vm.name)})")
    if state.owner != Owner.current():
        raise Busy(f"the snapshots of {vm.name} belong to {state.owner.describe()}")
    return state


def step_mount(ctx: Context, vm: VM) -> RunState:
    with journal.context(phase="mount"), ctx.store.lock(vm.name):
        state = _own_state(ctx, vm)
        ctx.lvm.settle()
        try:
            for rec in state.snapshots:
                disk = _disk(vm, state, rec.disk_slug)
                if disk.mode is not DiskMode.FILES:
                    continue
                target = ctx.store.mountpoint(vm.name, rec.disk_slug)
                entry = ctx.mounter.mount(rec.lv.path, target, disk.mount_options)
                state = state.with_snapshot(replace(rec, mountpoint=target))
                ctx.store.save(state)
                log.info("mounted %s (%s) read-only on %s", rec.lv, entry.fstype, target)
        except BaseException:
            # A failed mount aborts the job, and the snapshot must not outlive it.
            release(ctx, vm, state)
            raise
        state = replace(state, phase="backup")
        ctx.store.save(state)
        return state


# --- backup -----------------------------------------------------------------------------------

class _Current:
    """The restic process now running, so the overflow guard can stop it early."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False
        self._lock = threading.Lock()

    def set(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self.proc = proc
            # The guard may have fired before this restic started (a pool already nearly full).
            if self.stopped:
                proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)


def _backup_disk(ctx: Context, vm: VM, state: RunState, rec: SnapshotRecord, current: _Current) -> BackupSummary:
    disk = _disk(vm, state, rec.disk_slug)
    tags = tags_for(ctx.host, vm.name, str(disk.lv), disk.mode.value, state.run_id)
    reporter = Reporter(f"{vm.name} {disk.lv}", ctx.cfg.settings.progress_interval)
    try:
        if disk.mode is DiskMode.FILES:
            if not rec.mountpoint:
                raise StepError(f"snapshot {rec.lv} is not mounted; did the mount step run?")
            source = os.path.normpath(os.path.join(rec.mountpoint, disk.path))
            if not os.path.lexists(source):
                raise StepError(f"{disk.path} does not exist in the filesystem of {disk.lv}")
            # Relative to the mount point, so the stored tree reads like the origin's filesystem.
            return ctx.restic.backup([disk.path], tags, ctx.host, reporter, cwd=rec.mountpoint,
                                     on_start=current.set)
        with open(rec.lv.path, "rb") as dev:
            return ctx.restic.backup([], tags, ctx.host, reporter, stdin=dev, stdin_filename=f"{disk.slug}.img",
                                     on_start=current.set)
    finally:
        reporter.close()


def open_repository(ctx: Context) -> None:
    """Create a local repository on first use only.

    A local repository that held this host's backups and is gone now is an unmounted or lost disk; a new
    empty repository in its place would fill the wrong filesystem and hide the loss.
    """
    url = ctx.cfg.repository.url
    if ctx.cfg.repository.is_local and url in ctx.store.known_repositories() and not ctx.restic.is_initialized():
        raise RepositoryError(f"repository {url} held backups of this host but is not there now (is its disk "
                              "mounted?); not creating a new one there. If it is lost, `xenbackup init` starts "
                              "a new one")
    ctx.restic.ensure_initialized()
    ctx.store.remember_repository(url)


def step_backup(ctx: Context, vm: VM) -> RunState:
    with journal.context(phase="backup"):
        with ctx.store.lock(vm.name):
            state = _own_state(ctx, vm)
        current = _Current()
        watch = OverflowWatch(ctx.lvm, vm, state.snapshots, ctx.cfg.settings.watch_interval,
                              on_abort=current.stop)
        try:
            with watch:
                try:
                    state = _store_all(ctx, vm, state, current)
                except CommandError:
                    watch.check()  # restic stopped by the guard: report the overflow, not SIGTERM
                    raise
                watch.check()
        except SnapshotOverflowed:
            ctx.store.save(replace(state, peak_fill=watch.peak, overflowed=True))
            raise
        state = replace(state, peak_fill=watch.peak, phase="cleanup")
        ctx.store.save(state)
        return state


def _store_all(ctx: Context, vm: VM, state: RunState, current: _Current) -> RunState:
    """Back up every disk, then the domain config; record each restic snapshot as it appears."""
    totals = {"data_added": 0, "total_bytes": 0, "files": 0}
    for rec in state.snapshots:
        summary = _backup_disk(ctx, vm, state, rec, current)
        state = replace(state, restic_snapshots=(*state.restic_snapshots, summary.snapshot_id), summary=totals)
        ctx.store.save(state)
        log.info("stored %s as restic snapshot %s: %d files, %d bytes read, %d bytes new",
                 rec.origin, summary.snapshot_id[:8], summary.files, summary.total_bytes, summary.data_added)
        for key in totals:
            totals[key] += getattr(summary, key)
    if vm.domain_config and os.path.isfile(vm.domain_config):
        tags = tags_for(ctx.host, vm.name, "config", "config", state.run_id)
        summary = ctx.restic.backup([vm.domain_config], tags, ctx.host, lambda p: None)
        state = replace(state, restic_snapshots=(*state.restic_snapshots, summary.snapshot_id))
        ctx.store.save(state)
        log.info("saved domain config %s", vm.domain_config)
    elif vm.domain_config:
        log.warning("domain config %s does not exist; backing up the disks only", vm.domain_config)
    return replace(state, summary=dict(totals))


# --- cleanup ----------------------------------------------------------------------------------

def release(ctx: Context, vm: VM, state: RunState | None) -> list[str]:
    """Unmount and remove this run's snapshots, and anything else tagged for the VM. Idempotent."""
    removed: list[str] = []
    if state is not None and state.paused and _resume_left(ctx, vm, state):
        state = replace(state, paused="")
    for entry in mounts_below(ctx.store.mount_root(vm.name)):
        ctx.mounter.umount(entry.target)
        log.info("unmounted %s", entry.target)
    # One report serves both questions: did a snapshot overflow, and what carries our tag.
    tagged = ctx.lvm.tagged(vm.lv_tag)
    if state is not None and not state.overflowed and _any_invalid(ctx, state, tagged):
        state = replace(state, overflowed=True)
        ctx.store.save(state)
    names = {rec.name for rec in state.snapshots} if state else set()
    refs = [rec.lv for rec in state.snapshots] if state else []
    refs += [lv.ref for lv in tagged if lv.name not in names]
    for ref in refs:
        if ctx.lvm.remove(ref, ctx.cfg.settings.lvremove_retries):
            removed.append(str(ref))
            log.info("removed snapshot %s", ref)
    ctx.slots.release(vm.name)
    return removed


def _any_invalid(ctx: Context, state: RunState, tagged: list[LogicalVolume]) -> bool:
    by_name = {lv.name: lv for lv in tagged}
    for rec in state.snapshots:
        lv = by_name.get(rec.name)
        if lv is not None and not rec.thin and lv.is_invalid:
            log.error("snapshot %s is invalid: it overflowed during the run", rec.lv,
                      extra={"message_id": MessageId.OVERFLOW.value, "fields": {"snapshot": rec.lv}})
            return True
    return False


def forget_run(ctx: Context, state: RunState, why: str) -> None:
    """An untrustworthy run must not leave a restic snapshot that could be restored as good."""
    ids = set(state.restic_snapshots)
    # restic can store a snapshot and still fail (exit 3: some files unreadable), so ask it by run tag too.
    ids |= {s.id for s in ctx.restic.snapshots(["xenbackup", f"vm:{state.vm}", f"run:{state.run_id}"])}
    if ids:
        log.warning("forgetting restic snapshots %s of run %s: %s", ", ".join(sorted(i[:8] for i in ids)),
                    state.run_id, why)
        ctx.restic.forget(sorted(ids))


def step_cleanup(ctx: Context, vm: VM, result: str | None = None) -> int:
    """Release everything; log the run's outcome. Returns the exit code for this step."""
    # Cleanup must finish even if the unit is being stopped; systemd's timeout is the backstop.
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        return _cleanup(ctx, vm, result)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _cleanup(ctx: Context, vm: VM, result: str | None) -> int:
    with journal.context(phase="cleanup"), ctx.store.lock(vm.name):
        result = result or os.environ.get("SERVICE_RESULT", "unknown")
        detail = " ".join(f"{k}={os.environ[k]}" for k in ("EXIT_CODE", "EXIT_STATUS") if k in os.environ)
        log.info("cleanup after result=%s%s", result, f" ({detail})" if detail else "")
        state = ctx.store.load(vm.name)
        if state is not None and state.owner != Owner.current() and state.owner.alive():
            log.warning("a run owned by %s is in progress; leaving its snapshots alone",
                        state.owner.describe())
            return 0
        code = 0
        try:
            removed = release(ctx, vm, state)
            if not removed:
                log.info("no snapshot to remove")
        except Exception as exc:
            log.error("cleanup failed, a snapshot may be left: %s", exc)
            code = 1
        state = ctx.store.load(vm.name) or state
        if result != "success":
            _clear_stale_locks(ctx)
        if state is not None and state.overflowed:
            try:
                forget_run(ctx, state, "a snapshot overflowed, so what was read from it is inconsistent")
            except Exception as exc:
                log.error("could not forget the overflowed run's restic snapshots: %s", exc)
                code = 1
            result = "overflow"
            code = 1
        _finish(ctx, vm, state, result, code)
        return code


def _finish(ctx: Context, vm: VM, state: RunState | None, result: str, cleanup_code: int) -> None:
    if result == "success" and cleanup_code != 0:
        result = "cleanup-failed"
    ok = result == "success"
    now = time.time()
    record: dict[str, Any] = {
        "vm": vm.name, "result": result, "finished": now,
        "run_id": state.run_id if state else "", "started": state.started if state else None,
        "duration": (now - state.started) if state else None,
        "peak_fill": state.peak_fill if state else None,
        "pause_seconds": state.pause_seconds if state else None,
        "restic_snapshots": list(state.restic_snapshots) if state and ok else [],
        **(state.summary if state else {}),
    }
    if state is not None:
        _save_record(ctx, vm, record)
    fields: dict[str, object] = {"result": record["result"], "peak_fill": record["peak_fill"] or 0}
    if state is not None and state.pause_seconds is not None:
        fields.update(consistency=state.consistency, pause_seconds=f"{state.pause_seconds:.2f}")
    if ok:
        _event(logging.INFO, "backup of %s succeeded in %.0f s (snapshot peak fill %.1f%%)",
               MessageId.SUCCEEDED, vm.name, record["duration"] or 0, record["peak_fill"] or 0, **fields)
    elif state is not None:
        _event(logging.ERROR, "backup of %s failed (result=%s)", MessageId.FAILED, vm.name,
               record["result"], **fields)
    if state is not None and (ctx.store.load(vm.name) or state).paused:
        log.error("keeping the run state of %s: it records a guest still paused, for the next run or the sweep",
                  vm.name)
        return
    ctx.store.clear(vm.name)


# --- the whole job in one process -------------------------------------------------------------

def backup_foreground(ctx: Context, vm: VM) -> None:
    """`xenbackup backup VM`: the unit's steps in sequence, with cleanup on every outcome."""
    result = "exit-code"
    try:
        step_snapshot(ctx, vm)
        step_mount(ctx, vm)
        step_backup(ctx, vm)
        result = "success"
    except KeyboardInterrupt:
        result = "signal"
        raise
    finally:
        if step_cleanup(ctx, vm, result) != 0 and result == "success":
            raise StepError("the backup succeeded but its snapshot could not be removed")


# --- dry run ----------------------------------------------------------------------------------

def _window_argv(ctx: Context, vm: VM, disk_count: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The pause and resume commands a run would use ("auto" as it would be decided without an agent)."""
    method = choose(vm.consistency, vm.hypervisor, disk_count, lambda: False)
    xl, virsh = ctx.cfg.command("xl"), ctx.cfg.command("virsh")
    if method is Consistency.FREEZE:
        return (virsh, "domfsfreeze", vm.name), (virsh, "domfsthaw", vm.name)
    if method is Consistency.PAUSE:
        if vm.hypervisor is HypervisorKind.KVM:
            return (virsh, "suspend", vm.name), (virsh, "resume", vm.name)
        return (xl, "pause", vm.name), (xl, "unpause", vm.name)
    return (), ()


def plan(ctx: Context, vm: VM) -> list[PlannedCommand]:
    """Every command a run would execute, computed without touching anything."""
    out: list[PlannedCommand] = []
    stamp = "<YYYYmmddHHMMSS>"
    run_id = "<run-id>"
    tags = ["xenbackup", vm.lv_tag, f"xenbackup-run:{run_id}"]
    out.append(PlannedCommand("snapshot", tuple(ctx.lvm.lvs_argv([f"@{vm.lv_tag}"])),
                              "find leftovers of a crashed run (removed if found)"))
    disks = ctx.disks(vm)
    for disk in disks:
        where = "configured" if disk.source == "config" else f"found in the domain definition: {disk.source}"
        out.append(PlannedCommand("disks", (str(disk.lv), disk.mode.value, disk.path), where))
    for disk in disks:
        out.append(PlannedCommand("snapshot", tuple(ctx.lvm.lvs_argv([str(disk.lv)])), "check the origin"))
    pause, resume = _window_argv(ctx, vm, len(disks))
    if pause:
        out.append(PlannedCommand("snapshot", pause, f"{vm.consistency}: hold the guest still; at most "
                                  f"{vm.max_pause} s, only if it is running"))
    for disk in disks:
        name = snapshot_name(vm.name, disk, stamp)
        out.append(PlannedCommand("snapshot", tuple(ctx.lvm.create_snapshot_argv(
            disk.lv, name, vm.snapshot_size, tags)), "a thin origin gets a thin snapshot without --size"))
    if resume:
        out.append(PlannedCommand("snapshot", resume, "at once after the last snapshot"))
    for disk in disks:
        if disk.mode is DiskMode.FILES:
            name = snapshot_name(vm.name, disk, stamp)
            target = ctx.store.mountpoint(vm.name, disk.slug)
            opts = mount_options("<fstype>", True, disk.mount_options)
            out.append(PlannedCommand("mount", tuple(ctx.mounter.mount_argv(
                f"/dev/{disk.lv.vg}/{name}", target, "<fstype>", opts)),
                "xfs adds nouuid,norecovery; ext4 adds noload only when its journal is dirty"))
    for disk in disks:
        tags_r = tags_for(ctx.host, vm.name, str(disk.lv), disk.mode.value, run_id)
        if disk.mode is DiskMode.FILES:
            argv = ctx.restic.backup_argv([disk.path], tags_r, ctx.host)
            note = f"in {ctx.store.mountpoint(vm.name, disk.slug)}"
        else:
            argv = ctx.restic.backup_argv([], tags_r, ctx.host, stdin_filename=f"{disk.slug}.img")
            note = f"stdin from /dev/{disk.lv.vg}/{snapshot_name(vm.name, disk, stamp)}"
        out.append(PlannedCommand("backup", tuple(argv), note))
    if vm.domain_config:
        argv = ctx.restic.backup_argv([vm.domain_config], tags_for(ctx.host, vm.name, "config", "config",
                                                                    run_id), ctx.host)
        out.append(PlannedCommand("backup", tuple(argv), "if the domain config exists"))
    for disk in disks:
        name = snapshot_name(vm.name, disk, stamp)
        if disk.mode is DiskMode.FILES:
            out.append(PlannedCommand("cleanup", (ctx.cfg.command("umount"),
                                                  ctx.store.mountpoint(vm.name, disk.slug))))
        out.append(PlannedCommand("cleanup", tuple(ctx.lvm.remove_argv(type(disk.lv)(disk.lv.vg, name)))))
    return out


__all__ = ["Busy", "Context", "LvmError", "SnapshotOverflowed", "StepError", "backup_foreground", "plan",
           "step_backup", "step_cleanup", "step_mount", "step_snapshot", "sweep_stale"]
