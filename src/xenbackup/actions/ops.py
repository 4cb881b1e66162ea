"""Day-2 operations on the repository: retention (prune) and verification."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

from .. import journal, names
from ..model import VM, DiskMode, Retention
from .context import Context
from .restore import relative_tree, run_disks, select_run

log = logging.getLogger(__name__)


class VerifyFailed(Exception):
    pass


def policy_for(vm: VM, default: Retention) -> Retention:
    return vm.retention if vm.retention.forget_args() else default


def prune_groups(vm: VM, stored: Iterable[str] = ()) -> list[str]:
    """One retention group per disk (and one for the domain config), so each keeps whole runs alike.

    A VM whose disks are discovered groups by the disks its backups hold (`stored`, from their tags)."""
    disks = [str(d.lv) for d in vm.disks] or sorted({d for d in stored if d != names.CONFIG_DISK})
    return disks + ([names.CONFIG_DISK] if vm.domain_config else [])


def prune(ctx: Context, vm: VM) -> int:
    """restic forget, scoped to this host's snapshots of this VM. Returns how many runs were kept."""
    policy = policy_for(vm, ctx.cfg.default_retention)
    with journal.context(vm=vm.name, phase="prune"):
        if not policy.forget_args():
            log.warning("no retention policy for %s (set keep_* in [defaults] or [vm.%s]); keeping everything",
                        vm.name, vm.name)
            return -1
        ctx.restic.unlock_stale()
        stored: set[str] = set()
        if vm.discovers_disks:
            stored = {d for s in ctx.restic.snapshots(names.restic_filter(vm.name), host=ctx.host)
                      if (d := s.tag_value("disk"))}
        for group in prune_groups(vm, stored):
            tags = names.restic_filter(vm.name, disk=group, host=ctx.host)
            argv = ctx.restic.forget_policy_argv(tags, ctx.host, policy)
            log.info("applying %s to %s %s", " ".join(policy.forget_args()), vm.name, group)
            ctx.restic.run_argv(argv)
        kept = {s.tag_value("run") for s in ctx.restic.snapshots(names.restic_filter(vm.name), host=ctx.host)}
        log.info("%s now has %d backups", vm.name, len(kept))
        return len(kept)


def prune_repository(ctx: Context) -> bool:
    """restic prune once, after every VM's forget, on the host that [repository] prune designates."""
    with journal.context(phase="prune"):
        if not ctx.cfg.repository.prune:
            log.info("not pruning %s: [repository] prune = false leaves it to the fleet's designated host",
                     ctx.cfg.repository.display_url)
            return False
        log.info("pruning %s: removing data no snapshot of any host uses", ctx.cfg.repository.display_url)
        ctx.restic.prune()
        return True


@dataclass(frozen=True)
class RestoreTestResult:
    vm: str
    run_id: str
    entries: int
    bytes: int


def restore_test(ctx: Context, vm: VM, scratch_root: str = "/var/tmp") -> RestoreTestResult:
    """Restore the latest backup to scratch space and compare it with what restic recorded."""
    with journal.context(vm=vm.name, phase="verify"):
        sel = select_run(ctx.restic.snapshots(names.restic_filter(vm.name), host=ctx.host), "latest")
        entries = 0
        total = 0
        scratch = tempfile.mkdtemp(prefix="xenbackup-verify-", dir=scratch_root)
        try:
            for disk in run_disks(ctx, vm, sel):
                snap = sel.disks.get(str(disk.lv))
                if snap is None:
                    raise VerifyFailed(f"latest run {sel.run_id} of {vm.name} has no backup of {disk.lv}")
                nodes = ctx.restic.ls(snap.id)
                if disk.mode is DiskMode.BLOCK:
                    if names.SEGMENTED_TAG in snap.tags:
                        files = [(n.path, n.size) for n in nodes if n.type == "file"]
                    else:
                        name = f"/{disk.slug}.img"
                        files = [(name, next((n.size for n in nodes if n.path == name), -1))]
                    recorded = dict(files)
                    seen: dict[str, int] = {}
                    # One restic dump for all of a segmented image's files; restic checks every blob it reads.
                    ctx.restic.dump_in_order(snap.id, [name for name, _ in files], lambda data: None,
                                             seen.__setitem__)
                    for name, size in recorded.items():
                        if seen.get(name) != size:
                            raise VerifyFailed(f"{name} of {snap.short_id} reads back as {seen.get(name)} bytes, "
                                               f"recorded {size}")
                        entries, total = entries + 1, total + size
                    continue
                target = os.path.join(scratch, disk.slug)
                # --verify makes restic re-hash every restored file against the blob IDs it recorded.
                ctx.restic.restore(snap.id, target)
                found = relative_tree(target)
                for node in nodes:
                    rel = node.path.lstrip("/")
                    if node.type == "file" and found.get(rel) != node.size:
                        raise VerifyFailed(f"{node.path} of {snap.short_id}: restored {found.get(rel)} bytes, "
                                           f"recorded {node.size}")
                    if node.type == "file":
                        entries, total = entries + 1, total + node.size
            log.info("restore test of %s run %s passed: %d files, %d bytes", vm.name, sel.run_id, entries, total)
            return RestoreTestResult(vm.name, sel.run_id, entries, total)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def check_repository(ctx: Context, subset: str | None) -> None:
    with journal.context(phase="verify"):
        log.info("restic check%s", f" --read-data-subset {subset}" if subset else "")
        ctx.restic.unlock_stale()
        ctx.restic.check(subset)
        log.info("repository %s is consistent", ctx.cfg.repository.display_url)
