"""The backup lifecycle: snapshot → mount → back up → clean up, as idempotent steps."""

from __future__ import annotations

import contextvars
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from typing import TYPE_CHECKING

from .. import handoff, headstart, journal, names
from ..journal import MessageId
from ..model import VM, Consistency, Disk, DiskMode, SnapshotRecord, snapshot_name
from ..mount import mounts_below
from ..run import Child, CommandError
from ..state import Busy, Owner, RunState, new_run_id
from .context import Context, StepError

# Each step is a fresh interpreter that pays for every module it imports, and a module the backup step
# imports before restic starts lengthens the snapshot's life. So the sweep and the run record (snapshot and
# cleanup steps), the pause window (snapshot step), the overflow watch (backup step) and the LVM and restic
# adapters (not needed by the cleanup of a run that finished) are imported where they are used.
if TYPE_CHECKING:
    from ..lvm import Overview, VolumeGroup
    from ..repository import BackupSummary, Restic
    from .incremental import SegmentedBackup
    from .record import RunResult

log = logging.getLogger(__name__)


# --- snapshot ---------------------------------------------------------------------------------

def in_background(call: Callable[[], None]) -> Callable[..., None]:
    """Start `call` on a thread, in the caller's journal context. The returned function waits for it and
    raises what it raised, unless told `wait=False`."""
    context = contextvars.copy_context()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            context.run(call)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="xenbackup-background", daemon=True)
    thread.start()

    def finish(wait: bool = True) -> None:
        if wait:
            thread.join()
            if errors:
                raise errors[0]

    return finish


def not_busy(ctx: Context, vm: VM) -> RunState | None:
    """The VM's last run state, unless that run is alive: then Busy, before anything is started."""
    old = ctx.store.load(vm.name)
    if old is not None and old.owner != Owner.current() and old.owner.alive():
        raise Busy(f"a backup of {vm.name} is already running ({old.owner.describe()}, run {old.run_id})")
    return old


def claim(ctx: Context, vm: VM, old: RunState | None, run_id: str,
          config_first: bool = False) -> tuple[RunState, Overview]:
    """Take ownership of the VM for a new run (`old` as not_busy found it), clearing a dead run's
    leftovers first.

    Returns LVM's overview after that, for the checks before the snapshot window."""
    from .sweep import resume_paused, sweep_stale

    me = Owner.current()
    if old is not None:
        resume_paused(ctx, vm, old)
    seen = ctx.lvm.overview()
    if sweep_stale(ctx, vm, seen.tagged(vm.lv_tag)):
        seen = ctx.lvm.overview()  # the removed snapshots' space is free again
    state = RunState(vm=vm.name, run_id=run_id, owner=me, started=time.time(), config_first=config_first)
    ctx.store.save(state)
    return state, seen


def _record_stored(ctx: Context, vm: VM, run_id: str, stored: list[str]) -> None:
    """Note a config the key check stored before the step failed, so that cleanup forgets it."""
    state = ctx.store.load(vm.name) if stored else None
    if state is not None and state.run_id == run_id:
        ctx.store.save(state.with_stored(*stored))


def preflight(seen: Overview, vm: VM, disks: tuple[Disk, ...]) -> dict[str, bool]:
    """Check every origin and the free space before creating anything. Returns thin-ness per disk."""
    problems: list[str] = []
    thin: dict[str, bool] = {}
    need: dict[str, int] = {}
    vgs: dict[str, VolumeGroup] = {}
    for disk in disks:
        lv = seen.lv(disk.lv)
        if lv is None:
            problems.append(f"logical volume {disk.lv} does not exist")
            continue
        if lv.is_classic_snapshot or lv.origin:
            problems.append(f"{disk.lv} is itself a snapshot; configure its origin instead")
            continue
        thin[str(disk.lv)] = lv.is_thin
        if not lv.is_thin:
            if disk.lv.vg not in vgs:
                vgs[disk.lv.vg] = seen.vg(disk.lv.vg)
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
    from .window import PauseTooLong, ResumeFailed, choose, quiesced

    with journal.context(phase="snapshot"), ctx.store.lock(vm.name):
        old = not_busy(ctx, vm)
        # Everything that can fail or take time happens before the guest is paused. A run that cannot store
        # anything (wrong password, repository gone) must never make a snapshot: restic decrypts the
        # repository's key meanwhile, and is waited for before lvcreate. It starts first, beside LVM's
        # scan: its key derivation alone costs about half a second, and reading its binary cold longer. A
        # domain config that no disk's run can carry is stored by this restic: its one repository open is
        # then both the key check and the config's.
        run_id = new_run_id()
        config = config_stored_first(vm)
        stored: list[str] = []

        def store_config() -> None:
            assert config is not None
            tags = names.restic_tags(ctx.host, vm.name, names.CONFIG_DISK, names.CONFIG_DISK, run_id)
            stored.append(ctx.restic.store_opening(config, tags, ctx.host).snapshot_id)

        repository_opened = in_background(lambda: open_repository(ctx, store_config if config else None))
        try:
            state, seen = claim(ctx, vm, old, run_id, config_first=config is not None)
            journal.event(log, logging.INFO, "backup of %s started (run %s)", MessageId.STARTED, vm.name,
                          state.run_id, run=state.run_id)
            ctx.slots.acquire(vm.name, state.owner)
            disks = ctx.disks(vm, seen.volumes)
            for disk in disks:
                if disk.source != "config":
                    log.info("disk %s (%s mode) found in the domain definition: %s", disk.lv, disk.mode,
                             disk.source)
            thin = preflight(seen, vm, disks)
            hv = ctx.hypervisor(vm)
            method = choose(vm.consistency, vm.hypervisor, len(disks), lambda: hv.agent_answers(vm.name))
            if method is Consistency.FREEZE and not hv.agent_answers(vm.name):
                raise StepError(f"consistency = \"freeze\" but the qemu guest agent of {vm.name} does not answer")
        except BaseException:
            # This error is the one to report. restic, reading only, is not waited for: a remote repository
            # that does not answer would hold a stop request up for restic's minute of retries.
            repository_opened(wait=False)
            _record_stored(ctx, vm, run_id, stored)
            raise
        repository_opened()
        if stored:
            state = state.with_stored(*stored)
            log.info("saved domain config %s", config)
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        tags = names.lv_tags(vm.name, state.run_id)
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
                        if state.snapshot_created is None:
                            state = replace(state, snapshot_created=time.time())
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
        # Block-mode disks are read through the same links by the backup step.
        ctx.lvm.wait_for([rec.lv.path for rec in state.snapshots])
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


def step_prepare(ctx: Context, vm: VM) -> RunState:
    """The unit's one `ExecStartPre=`: snapshot, then mount, in one process.

    Every interpreter start after `lvcreate` lengthens the snapshot's life (about a second under
    emulation), and a classic snapshot costs the VM's writes for as long as it lives.
    """
    step_snapshot(ctx, vm)
    state = step_mount(ctx, vm)
    if handoff.possible():
        leave_head_start(ctx, vm, state)
    return state


def leave_head_start(ctx: Context, vm: VM, state: RunState) -> None:
    """Leave this invocation's backup step its first restic command, to start before it loads its code."""
    rec = state.snapshots[0] if state.snapshots else None
    if rec is None:
        return
    disk = _disk(vm, state, rec.disk_slug)
    if disk.mode is DiskMode.BLOCK and rec.thin and ctx.cfg.settings.thin_incremental:
        return  # its restic reads a FUSE mount the backup step sets up first
    config, carrier = _carried_config(vm, state)
    _leave(ctx, vm, headstart.BACKUP,
           lambda: _backup_disk(ctx, vm, state, rec, _Current(), config if rec.disk_slug == carrier else None))


def leave_key_check(ctx: Context, vm: VM) -> None:
    """Leave the VM's next prepare step its repository key check, to start before it loads its code. A VM
    whose snapshot step stores the domain config in its place gets none: that run's tags name the run."""
    if config_stored_first(vm) is None:
        _leave(ctx, vm, headstart.PREPARE, ctx.restic.read_config)


def _leave(ctx: Context, vm: VM, step: str, code: Callable[[], object]) -> None:
    """Rehearse `code` up to its first command and leave that command for `step` (see headstart). Nothing here
    can fail the run: without a head start a step runs as ever."""
    from ..run import Rehearsed, rehearsal

    try:
        with rehearsal():
            code()
        return
    except Rehearsed as rehearsed:
        command = rehearsed
    except Exception as exc:  # the step meets the same problem and reports it
        log.debug("no head start for the %s step: %s", step, exc)
        return
    try:
        files = ctx.restic.environment_files()
        from_files = ctx.restic.environment_keys()
        kept = {k: v for k, v in command.env.items() if not any(s and s in v for s in command.secrets)}
        if set(command.env) - set(kept) - from_files or any(s and s in a for s in command.secrets
                                                            for a in command.argv):
            log.debug("no head start for the %s step: its command needs a secret that is in no file", step)
            return
        headstart.leave(step, vm.name, command.argv, kept, command.cwd, command.stdin, files)
    except Exception as exc:
        log.debug("no head start for the %s step: %s", step, exc)


# --- backup -----------------------------------------------------------------------------------

class _Current:
    """The restic process now running, so the overflow guard can stop it early."""

    def __init__(self) -> None:
        self.proc: Child | None = None
        self.stopped = False
        self._lock = threading.Lock()

    def set(self, proc: Child) -> None:
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


def _backup_disk(ctx: Context, vm: VM, state: RunState, rec: SnapshotRecord, current: _Current,
                 with_config: str | None = None) -> BackupSummary | SegmentedBackup:
    # Only the backup step reads data: the other steps need no progress code, and only a thin disk's run
    # the segment code.
    from ..progress import Reporter

    disk = _disk(vm, state, rec.disk_slug)
    tags = names.restic_tags(ctx.host, vm.name, str(disk.lv), disk.mode.value, state.run_id)
    if with_config:
        tags.append(names.CONFIG_INSIDE)
    reporter = Reporter(f"{vm.name} {disk.lv}", ctx.cfg.settings.progress_interval)
    try:
        if disk.mode is DiskMode.BLOCK and rec.thin and ctx.cfg.settings.thin_incremental:
            from .incremental import backup_thin

            return backup_thin(ctx, vm, disk, rec, tags, reporter, current.set)
        if disk.mode is DiskMode.FILES:
            if not rec.mountpoint:
                raise StepError(f"snapshot {rec.lv} is not mounted; did the mount step run?")
            source = os.path.normpath(os.path.join(rec.mountpoint, disk.path))
            if not os.path.lexists(source):
                raise StepError(f"{disk.path} does not exist in the filesystem of {disk.lv}")
            # Relative to the mount point, so the stored tree reads like the origin's filesystem.
            paths = [disk.path, *([with_config] if with_config else [])]
            return ctx.restic.backup(paths, tags, ctx.host, reporter, cwd=rec.mountpoint, on_start=current.set)
        with open(rec.lv.path, "rb") as dev:
            return ctx.restic.backup([], tags, ctx.host, reporter, stdin=dev, stdin_filename=f"{disk.slug}.img",
                                     on_start=current.set)
    finally:
        reporter.close()


def open_repository(ctx: Context, opening: Callable[[], None] | None = None) -> None:
    """Create a local repository on first use only. `opening` opens it anyway, in the key check's place.

    A local repository that held this host's backups and is gone now is an unmounted or lost disk; a new
    empty repository in its place would fill the wrong filesystem and hide the loss.
    """
    from ..repository import RepositoryError

    url = ctx.cfg.repository.url
    if ctx.cfg.repository.is_local and not ctx.restic.is_initialized():
        with ctx.store.repository_lock():
            if url in ctx.store.known_repositories() and not ctx.restic.is_initialized():
                raise RepositoryError(f"repository {url} held backups of this host but is not there now (is its "
                                      "disk mounted?); not creating a new one there. If it is lost, `xenbackup "
                                      "init` starts a new one")
            ctx.restic.ensure_initialized()
        if opening is not None:
            opening()
    else:
        ctx.restic.ensure_initialized(opening)
    ctx.store.remember_repository(url)
    if ctx.cfg.repository.lock_wait:
        # Asked now, beside LVM, and remembered: the backup step then spawns no `restic version` while the
        # snapshot lives.
        ctx.restic.has_retry_lock()


def step_backup(ctx: Context, vm: VM, finish: bool = False) -> RunState:
    """Store every disk, then release the snapshots. With `finish` (the unit's own step), a run that went
    well is also finished here, leaving its cleanup step nothing to do (see handoff)."""
    from .watch import OverflowWatch, SnapshotOverflowed

    with journal.context(phase="backup"):
        with ctx.store.lock(vm.name):
            state = _own_state(ctx, vm)
        current = _Current()
        watch = OverflowWatch(ctx.lvm, vm, state.snapshots, ctx.cfg.settings.watch_interval,
                              on_abort=current.stop)
        try:
            with watch:
                try:
                    state, alone = _store_all(ctx, vm, state, current)
                except Exception:
                    # Whatever broke the run (restic stopped by the guard, or dmeventd unmounting the invalid
                    # snapshot before restic started), an overflow the watch saw is the verdict, not the
                    # symptom.
                    watch.check()
                    raise
                watch.check()
        except SnapshotOverflowed:
            ctx.store.save(replace(state, peak_fill=watch.peak, overflowed=True))
            raise
        state = replace(state, peak_fill=watch.peak, phase="cleanup")
        ctx.store.save(state)
        # Stored: the snapshots go now rather than after cleanup's interpreter start, since every second of
        # a classic snapshot costs the VM's writes. The watch's last look came after restic had read
        # everything, so a snapshot invalidated from here on spoils nothing that was read.
        released = True
        with ctx.store.lock(vm.name):
            try:
                release_own(ctx, vm, state, judge=False)
            except Exception as exc:
                # The data is stored; a snapshot still busy is cleanup's to retry, and its verdict to give.
                log.warning("could not remove the snapshots of %s yet (%s); cleanup tries again", vm.name, exc)
                released = False
            state = ctx.store.load(vm.name) or state
        if alone is not None:
            state = _store_config_alone(ctx, vm, state, alone)
        if released and handoff.possible():
            leave_key_check(ctx, vm)
            if finish:
                with ctx.store.lock(vm.name):
                    finish_early(ctx, vm, state)
        return state


def finish_early(ctx: Context, vm: VM, state: RunState) -> None:
    """Do a good run's cleanup in the backup step: its own process already holds everything needed, while
    the cleanup step would start an interpreter and load the config again just for this. Only the plain
    case: anything cleanup has more to do for (a snapshot left, a paused guest, an overflow, a failed run
    before this one whose repository locks may be stale) is left to it."""
    from .record import RunResult

    if state.snapshots or state.paused or state.overflowed or last_run_failed(ctx, vm):
        return
    with journal.context(phase="cleanup"):
        ctx.slots.release(vm.name)
        _finish(ctx, vm, state, RunResult.SUCCESS, 0)
        try:
            handoff.leave(vm.name)
        except OSError as exc:
            # The cleanup step then runs in full; with the run state cleared it finds nothing of this run's.
            log.warning("could not tell the cleanup step that the run is finished: %s", exc)


def _store_all(ctx: Context, vm: VM, state: RunState, current: _Current) -> tuple[RunState, str | None]:
    """Back up every disk, and the domain config with the first files-mode disk that can carry it; record
    each restic snapshot as it appears. Returns the config still to be stored on its own, if any."""
    from ..repository import BackupSummary

    totals: dict[str, float] = {"data_added": 0, "total_bytes": 0, "files": 0, "restic_seconds": 0.0}
    config, carrier = _carried_config(vm, state)
    for rec in state.snapshots:
        result = _backup_disk(ctx, vm, state, rec, current, config if rec.disk_slug == carrier else None)
        summary = result if isinstance(result, BackupSummary) else result.summary
        state = replace(state.with_stored(summary.snapshot_id), summary=totals)
        ctx.store.save(state)
        if not isinstance(result, BackupSummary):
            from .incremental import keep_base

            keep_base(ctx, vm, _disk(vm, state, rec.disk_slug), state.run_id, result.base)
            # From here on the snapshot is the base: no cleanup may remove it as this run's.
            state = replace(state, snapshots=tuple(s for s in state.snapshots if s.name != rec.name))
            ctx.store.save(state)
        log.info("stored %s as restic snapshot %s: %d files, %d bytes read, %d bytes new",
                 rec.origin, summary.snapshot_id[:8], summary.files, summary.total_bytes, summary.data_added)
        for key in ("data_added", "total_bytes", "files"):
            totals[key] += getattr(summary, key)
        totals["restic_seconds"] = round(totals["restic_seconds"] + summary.duration, 3)
    if config and carrier:
        log.info("saved domain config %s with %s", config, _disk(vm, state, carrier).lv)
    elif vm.domain_config and not config and not state.config_first:
        log.warning("domain config %s does not exist; backing up the disks only", vm.domain_config)
    return replace(state, summary=dict(totals)), None if carrier else config


def _carried_config(vm: VM, state: RunState) -> tuple[str | None, str | None]:
    """The domain config to store, if it exists, and the slug of the disk whose run carries it, if any.

    The config rides in the first files-mode disk's run where it can: a restic run of its own costs another
    repository open (keys, index, lock). A run whose snapshot step stored it has none left to store."""
    if state.config_first:
        return None, None
    config = vm.domain_config if vm.domain_config and os.path.isfile(vm.domain_config) else None
    carrier = next((rec.disk_slug for rec in state.snapshots if config
                    and (d := _disk(vm, state, rec.disk_slug)).mode is DiskMode.FILES
                    and names.config_rides_along(d.path, config)), None)
    return config, carrier


def config_stored_first(vm: VM) -> str | None:
    """The domain config that the snapshot step stores, in place of its repository key check: one that no
    configured disk's run can carry, since the disks are all block devices (restic 0.14 cannot mix --stdin
    with files) or a tree the config's path could collide with. The key check opens the repository anyway,
    and this run of restic checks the key as well. A VM whose disks are discovered is known to need it only
    once they are found, after the key check has started; it stores its config once the snapshots are gone."""
    config = vm.domain_config
    if not config or vm.discovers_disks or not os.path.isfile(config):
        return None
    if any(d.mode is DiskMode.FILES and names.config_rides_along(d.path, config) for d in vm.disks):
        return None
    return config


def _store_config_alone(ctx: Context, vm: VM, state: RunState, config: str) -> RunState:
    """The domain config in a restic run of its own, when only the discovered disks told that none can carry
    it (see config_stored_first). It reads nothing from a snapshot, so it runs once they are gone rather than
    lengthen their lives."""
    tags = names.restic_tags(ctx.host, vm.name, names.CONFIG_DISK, names.CONFIG_DISK, state.run_id)
    summary = ctx.restic.backup([config], tags, ctx.host, lambda p: None)
    state = state.with_stored(summary.snapshot_id)
    ctx.store.save(state)
    log.info("saved domain config %s", config)
    return state


# --- cleanup ----------------------------------------------------------------------------------

def release(ctx: Context, vm: VM, state: RunState | None, leftovers: bool = True) -> list[str]:
    """Unmount and remove this run's snapshots; with `leftovers`, also anything else tagged for the VM and
    the thin pools' metadata snapshots a killed run left reserved. Idempotent."""
    from .sweep import resume_paused

    removed: list[str] = []
    if state is not None and state.paused and resume_paused(ctx, vm, state):
        state = replace(state, paused="")
    if state is not None:
        removed = release_own(ctx, vm, state)
    else:
        _unmount_all(ctx, vm)
    if leftovers:
        for lv in ctx.lvm.tagged(vm.lv_tag):
            if ctx.lvm.remove(lv.ref, ctx.cfg.settings.lvremove_retries):
                removed.append(str(lv.ref))
                log.info("removed snapshot %s", lv.ref)
        ctx.pools().release_leftovers()
    ctx.slots.release(vm.name)
    return removed


def _unmount_all(ctx: Context, vm: VM) -> None:
    for entry in mounts_below(ctx.store.mount_root(vm.name)):
        ctx.mounter.umount(entry.target)
        log.info("unmounted %s", entry.target)


def release_own(ctx: Context, vm: VM, state: RunState, judge: bool = True) -> list[str]:
    """Unmount and remove the snapshots the run state names, judged first by the kernel's counters.

    The run state then names none: a later cleanup has nothing of this run's left to spawn for. The `lvs`
    that finds whatever else carries our tag scans every PV, and is left to cleanup, after the snapshots
    stopped costing the VM."""
    removed: list[str] = []
    _unmount_all(ctx, vm)
    if judge and not state.overflowed and _any_invalid(ctx, state):
        state = replace(state, overflowed=True)
        ctx.store.save(state)
    for rec in state.snapshots:
        if ctx.lvm.remove(rec.lv, ctx.cfg.settings.lvremove_retries):
            removed.append(str(rec.lv))
            log.info("removed snapshot %s", rec.lv)
    state = replace(ctx.store.load(vm.name) or state, snapshots=(), overflowed=state.overflowed)
    if state.snapshot_created is not None and state.snapshot_seconds is None:
        seconds = round(time.time() - state.snapshot_created, 3)
        log.info("the snapshots of %s existed for %.1f s", vm.name, seconds,
                 extra={"fields": {"snapshot_seconds": f"{seconds:.2f}"}})
        state = replace(state, snapshot_seconds=seconds)
    ctx.store.save(state)
    return removed


def _any_invalid(ctx: Context, state: RunState) -> bool:
    classic = [rec for rec in state.snapshots if not rec.thin]
    if not classic:
        return False
    from ..lvm import LvmError

    for rec in classic:
        try:
            status = ctx.lvm.snapshot_status(rec.lv)
            invalid = status is not None and status.invalid
        except (CommandError, LvmError) as exc:
            log.warning("cannot read the kernel's state of snapshot %s (%s); asking LVM", rec.lv, exc)
            lv = ctx.lvm.lv(rec.lv)
            invalid = lv is not None and lv.is_invalid
        if invalid:
            log.error("snapshot %s is invalid: it overflowed during the run", rec.lv,
                      extra={"message_id": MessageId.OVERFLOW.value, "fields": {"snapshot": rec.lv}})
            return True
    return False


CLEANUP_LOCK_WAIT = 120
"""Seconds cleanup waits for another process's repository lock: systemd gives ExecStopPost= 5 minutes
(TimeoutStopSec=), and lvremove's retries need their share of it."""

CLEANUP_GIVE_UP_AFTER = 30
"""Seconds each restic command of cleanup's stale-lock clearing may take. A reachable repository answers in a
few; a remote one that does not answer keeps restic 0.14 retrying for minutes (ten tries with backoff, each
waiting for its connection to time out), and the next run clears the locks anyway."""


def forget_run(restic: Restic, state: RunState, why: str) -> None:
    """An untrustworthy run must not leave a restic snapshot that could be restored as good."""
    ids = set(state.restic_snapshots)
    # restic can store a snapshot and still fail (exit 3: some files unreadable), so ask it by run tag too.
    ids |= {s.id for s in restic.snapshots(names.restic_filter(state.vm, run_id=state.run_id))}
    if ids:
        log.warning("forgetting restic snapshots %s of run %s: %s", ", ".join(sorted(i[:8] for i in ids)),
                    state.run_id, why)
        restic.forget(sorted(ids))


def step_cleanup(ctx: Context, vm: VM, result: RunResult | None = None) -> int:
    """Release everything; log the run's outcome. Returns the exit code for this step."""
    # Cleanup must finish even if the unit is being stopped; systemd's timeout is the backstop.
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        return _cleanup(ctx, vm, result)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _cleanup(ctx: Context, vm: VM, result: RunResult | None) -> int:
    from .record import RunResult
    from .sweep import clear_stale_locks

    with journal.context(phase="cleanup"), ctx.store.lock(vm.name):
        result = result or RunResult.parse(os.environ.get("SERVICE_RESULT"))
        handoff.discard()  # a backup step that finished the run before being told it failed
        headstart.discard()  # a backup step that never started
        detail = " ".join(f"{k}={os.environ[k]}" for k in ("EXIT_CODE", "EXIT_STATUS") if k in os.environ)
        log.info("cleanup after result=%s%s", result, f" ({detail})" if detail else "")
        state = ctx.store.load(vm.name)
        if state is not None and state.owner != Owner.current() and state.owner.alive():
            log.warning("a run owned by %s is in progress; leaving its snapshots alone",
                        state.owner.describe())
            return 0
        code = 0
        try:
            # A run whose every step succeeded recorded each snapshot before using it, and its backup step
            # removed them: the `lvs` that scans every PV for other leftovers is for runs that broke off
            # (the next run's start and the boot sweep look as well).
            finished = result is RunResult.SUCCESS and state is not None and state.phase == "cleanup"
            removed = release(ctx, vm, state, leftovers=not finished)
            if not removed and not finished:
                log.info("no snapshot to remove")
        except Exception as exc:
            log.error("cleanup failed, a snapshot may be left: %s", exc)
            code = 1
        state = ctx.store.load(vm.name) or state
        if result is not RunResult.SUCCESS or last_run_failed(ctx, vm):
            # A failed run's restic may have died with its lock still in the repository, and its cleanup
            # may not have reached the repository either (a remote one that was down); a good run's shared
            # lock never meets it, but check, prune and forget would.
            clear_stale_locks(ctx, CLEANUP_GIVE_UP_AFTER)
        if (state is not None and state.config_first and not state.overflowed and result is not RunResult.SUCCESS
                and len(state.restic_snapshots) == 1):
            try:
                forget_run(ctx.restic.waiting_at_most(CLEANUP_LOCK_WAIT), state,
                           "the run stored its domain config but no disk")
            except Exception as exc:
                # A config without its disks restores nothing; the next prune's count is all it disturbs.
                log.warning("could not forget the failed run's domain config snapshot: %s", exc)
        if state is not None and state.overflowed:
            try:
                forget_run(ctx.restic.waiting_at_most(CLEANUP_LOCK_WAIT), state,
                           "a snapshot overflowed, so what was read from it is inconsistent")
            except Exception as exc:
                log.error("could not forget the overflowed run's restic snapshots: %s", exc)
                code = 1
            result = RunResult.OVERFLOW
            code = 1
        _finish(ctx, vm, state, result, code)
        return code


def last_run_failed(ctx: Context, vm: VM) -> bool:
    """Whether the VM's last recorded run (before this one) did not succeed."""
    from .record import RunResult

    previous = ctx.store.read_record(vm.name)
    return previous is not None and previous.get("result") != RunResult.SUCCESS.value


def note_failure(ctx: Context, vm: VM, exc: BaseException) -> None:
    """Keep why a step of this run failed in its state, so that cleanup's verdict can say it.

    Never raises: the step's own error is what the caller reports."""
    try:
        with ctx.store.lock(vm.name):
            state = ctx.store.load(vm.name)
            if state is not None and state.owner == Owner.current() and not state.error:
                ctx.store.save(replace(state, error=str(exc) or type(exc).__name__))
    except Exception as err:
        log.debug("could not record why the step failed: %s", err)


def _finish(ctx: Context, vm: VM, state: RunState | None, result: RunResult, cleanup_code: int) -> None:
    from .record import RunRecord, RunResult, save_record

    if result is RunResult.SUCCESS and cleanup_code != 0:
        result = RunResult.CLEANUP_FAILED
    if state is None:
        ctx.store.clear(vm.name)
        return
    record = save_record(ctx, RunRecord.of_run(vm, state, result, time.time()))
    fields: dict[str, object] = {"result": record.result.value, "peak_fill": record.peak_fill or 0}
    if state.pause_seconds is not None:
        fields.update(consistency=state.consistency, pause_seconds=f"{state.pause_seconds:.2f}")
    if state.snapshot_seconds is not None:
        fields.update(snapshot_seconds=f"{state.snapshot_seconds:.2f}")
    if "restic_seconds" in state.summary:
        fields.update(restic_seconds=f"{float(state.summary['restic_seconds']):.2f}")
    if record.result is RunResult.SUCCESS:
        journal.event(log, logging.INFO, "backup of %s succeeded in %.0f s (snapshot peak fill %.1f%%)",
                      MessageId.SUCCEEDED, vm.name, record.duration or 0, record.peak_fill or 0, **fields)
    else:
        if record.error:
            fields.update(error=record.error)
        journal.event(log, logging.ERROR, "backup of %s failed (result=%s)%s", MessageId.FAILED, vm.name,
                      record.result.value, f": {record.error}" if record.error else "", **fields)
    if (ctx.store.load(vm.name) or state).paused:
        log.error("keeping the run state of %s: it records a guest still paused, for the next run or the sweep",
                  vm.name)
        return
    ctx.store.clear(vm.name)


# --- the whole job in one process -------------------------------------------------------------

def backup_foreground(ctx: Context, vm: VM) -> None:
    """`xenbackup backup VM`: the unit's steps in sequence, with cleanup on every outcome."""
    from .record import RunResult

    result = RunResult.EXIT_CODE
    try:
        step_prepare(ctx, vm)
        step_backup(ctx, vm)
        result = RunResult.SUCCESS
    except KeyboardInterrupt as exc:
        result = RunResult.SIGNAL
        note_failure(ctx, vm, exc)
        raise
    except Exception as exc:
        note_failure(ctx, vm, exc)
        raise
    finally:
        if step_cleanup(ctx, vm, result) != 0 and result is RunResult.SUCCESS:
            raise StepError("the backup succeeded but its snapshot could not be removed")


__all__ = ["Busy", "backup_foreground", "note_failure", "step_backup", "step_cleanup",
           "step_mount", "step_prepare", "step_snapshot"]
