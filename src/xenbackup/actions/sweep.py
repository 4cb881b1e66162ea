"""Leftovers of interrupted runs: swept before each run, after each, and at boot (`xenbackup sweep`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from .. import journal, names
from ..journal import MessageId
from ..model import VM
from ..mount import mounts_below
from ..state import Busy, RunState
from .context import Context
from .record import record_interrupted

if TYPE_CHECKING:
    from ..lvm import LogicalVolume

log = logging.getLogger(__name__)


def sweep_stale(ctx: Context, vm: VM, tagged: Sequence[LogicalVolume] | None = None) -> list[str]:
    """Unmount and remove what an earlier crashed run of this VM left. Only tagged LVs are touched: those
    given (found by the caller's own `lvs`), else those LVM lists now."""
    removed: list[str] = []
    for entry in mounts_below(ctx.store.mount_root(vm.name)):
        log.warning("unmounting leftover mount %s", entry.target)
        ctx.mounter.umount(entry.target)
    for lv in ctx.lvm.tagged(vm.lv_tag) if tagged is None else tagged:
        ctx.lvm.remove(lv.ref, ctx.cfg.settings.lvremove_retries)
        removed.append(str(lv.ref))
        journal.event(log, logging.WARNING, "removed stale snapshot %s left by an earlier run",
                      MessageId.STALE_REMOVED,
                             lv.ref, snapshot=lv.ref)
    ctx.pools().release_leftovers()
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
                    paused = state is not None and not resume_paused(ctx, vm, state)
                    left = sweep_stale(ctx, vm)
                    if left:
                        record_interrupted(ctx, vm, left)
                    removed += left
                    if not paused:
                        ctx.store.clear(vm.name)
            except Busy:
                log.info("a run of %s is in progress; not sweeping it", vm.name)
    known = {vm.lv_tag for vm in ctx.cfg.vms.values()}
    # A base is kept only for the next incremental run: once its VM has left the config, or incrementals are
    # off, it would hold pool space as its origin diverges, for ever.
    bases = {names.lv_base_tag(vm) for vm in ctx.cfg.vms} if ctx.cfg.settings.thin_incremental else set()
    for lv in ctx.lvm.tagged(names.TAG):
        base_tags = [t for t in lv.tags if t.startswith(names.LV_BASE_TAG_PREFIX)]
        vm_tags = [t for t in lv.tags if t.startswith(names.LV_VM_TAG_PREFIX)]
        if base_tags and not bases.intersection(base_tags):
            why = "removed the incremental base %s: its VM is no longer configured or thin_incremental is off"
        elif vm_tags and not known.intersection(vm_tags):
            why = "removed stale snapshot %s of an unconfigured VM"
        else:
            continue
        ctx.lvm.remove(lv.ref, ctx.cfg.settings.lvremove_retries)
        removed.append(str(lv.ref))
        journal.event(log, logging.WARNING, why, MessageId.STALE_REMOVED, lv.ref, snapshot=lv.ref)
    # A thin pool's metadata snapshot survives a reboot; a run killed while holding one must not keep it.
    ctx.pools().release_leftovers()
    # At boot the network may not be up; the next run clears a remote repository's locks anyway.
    if removed and ctx.cfg.repository.is_local:
        clear_stale_locks(ctx)
    return removed


def resume_paused(ctx: Context, vm: VM, state: RunState) -> bool:
    """A run killed inside its snapshot window leaves the guest paused; it must never stay that way.

    False if the guest could not be resumed: the record of the pause is then kept, so the next cleanup,
    run or boot sweep tries again."""
    if not state.paused:
        return True
    from .window import resume_left  # the hypervisor adapter, for the rare run that broke off mid-pause

    try:
        resume_left(ctx.hypervisor(vm), vm.name, state.paused)
    except Exception as exc:
        log.critical("%s is still %s by an interrupted run and could not be resumed: %s; resume it by hand",
                     vm.name, "frozen" if state.paused == "freeze" else "paused", exc)
        return False
    ctx.store.save(replace(state, paused=""))
    return True


def clear_stale_locks(ctx: Context, give_up_after: float | None = None) -> None:
    """A killed restic leaves its lock behind, which would block prune, check and restore. With give_up_after,
    each restic command is stopped after that many seconds: the next run clears the locks as well."""
    try:
        restic = ctx.restic if give_up_after is None else ctx.restic.giving_up_after(give_up_after)
        restic.unlock_stale()
    except Exception as exc:
        log.warning("could not clear stale repository locks: %s", exc)
