"""Block-mode backups of thin LVs that read only what changed since the last run (thin_delta + segments).

The run's thin snapshot is shown to restic as a read-only directory of segment files whose mtimes stay as
in the parent restic snapshot unless thin_delta reports a change inside them; restic then takes the
unchanged ones from the parent unread. After a good backup the snapshot stays as the next run's base.
Anything doubtful about the base means a full read, never a wrong incremental."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .. import names, segfs
from ..model import VM, Disk, LvRef, SnapshotRecord
from ..progress import Reporter
from ..repository import BackupSummary
from ..run import Child, CommandError, run
from ..state import write_atomic
from ..thin import (
    SEGMENT_SIZE,
    Base,
    DeltaError,
    Facts,
    changed_segments,
    parent_listed,
    plan_segments,
    segment_count,
    why_not_incremental,
)
from .context import Context, StepError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentedBackup:
    summary: BackupSummary
    base: Base
    """The base this run leaves for the next one, once its snapshot is kept."""
    bytes_read: int
    changed: int | None
    """Segments read because they changed; None for a full read."""


def base_path(ctx: Context, vm: str, slug: str) -> str:
    return os.path.join(ctx.cfg.settings.state_dir, "bases", vm, f"{slug}.json")


def load_base(ctx: Context, vm: str, slug: str) -> Base | None:
    try:
        with open(base_path(ctx, vm, slug), encoding="utf-8") as f:
            return Base.from_json(f.read())
    except FileNotFoundError:
        return None
    except (OSError, DeltaError) as exc:
        log.warning("ignoring the recorded base of %s: %s", slug, exc)
        return None


def _delta_segments(ctx: Context, vm: VM, disk: Disk, rec: SnapshotRecord, base: Base | None,
                    device_bytes: int) -> tuple[frozenset[int] | None, str]:
    """The changed segments, or None and why the whole device must be read."""
    tp = ctx.pools()
    origin = tp.lv(disk.lv)
    snap = tp.lv(rec.lv)
    if origin is None or snap is None or origin.pool_ref is None or snap.thin_id is None:
        return None, f"{disk.lv} or its snapshot is not a thin volume LVM can describe"
    if snap.size != origin.size or snap.pool != origin.pool:
        return None, f"the snapshot {rec.lv} does not match {disk.lv}"
    base_lv = tp.lv(LvRef.parse(base.lv)) if base is not None else None
    parents: Iterable[str] = ()
    if base is not None:
        parents = {s.id for s in ctx.restic.snapshots(names.restic_filter(vm.name, disk=str(disk.lv)))}
    facts = Facts(origin=str(disk.lv), origin_bytes=origin.size, pool=str(origin.pool_ref),
                  base_lv_exists=base_lv is not None and names.lv_base_tag(vm.name) in base_lv.tags,
                  base_lv_origin=base_lv.origin if base_lv else "",
                  base_thin_id=base_lv.thin_id if base_lv else None,
                  parent_in_repository=base is not None and parent_listed(base.restic_snapshot, parents))
    why = why_not_incremental(base, facts)
    if why is not None or base is None:
        return None, why or "no base"
    try:
        delta = tp.delta(origin.pool_ref, base.thin_id, snap.thin_id)
    except (DeltaError, CommandError) as exc:
        return None, str(exc)
    changed = changed_segments(delta)
    if changed and max(changed) >= segment_count(device_bytes):
        return None, "thin_delta reports changes beyond the end of the device"
    log.info("thin_delta: %d bytes in %d ranges changed since %s, in %d of %d segments", delta.changed_bytes,
             len(delta.changed), base.lv, len(changed), segment_count(device_bytes))
    return changed, ""


def backup_thin(ctx: Context, vm: VM, disk: Disk, rec: SnapshotRecord, tags: list[str], reporter: Reporter,
                on_start: Callable[[Child], None]) -> SegmentedBackup:
    """Back up a thin snapshot as segment files, reading only the segments changed since the base."""
    why = segfs.available()
    if why is not None:
        raise StepError(f"thin_incremental is on but {why}")
    with open(rec.lv.path, "rb") as dev:
        device_bytes = dev.seek(0, os.SEEK_END)
    base = load_base(ctx, vm.name, disk.slug)
    changed, reason = _delta_segments(ctx, vm, disk, rec, base, device_bytes)
    if changed is None:
        log.info("reading all of %s: %s", disk.lv, reason)
    segments = plan_segments(device_bytes, time.time_ns(), base if changed is not None else None, changed)
    mountpoint = ctx.store.mountpoint(vm.name, disk.slug)
    options = ["--parent", base.restic_snapshot] if changed is not None and base is not None else ["--force"]

    def umount(path: str) -> None:
        run([ctx.cfg.command("umount"), path])

    with segfs.segment_view(rec.lv.path, mountpoint, segments, umount) as view:
        summary = ctx.restic.backup([mountpoint], [*tags, names.SEGMENTED_TAG], ctx.host, reporter,
                                    on_start=on_start, options=options)
        bytes_read = int(view.bytes_read)
    log.info("%s: read %d of %d bytes (%s), restic took %d of %d segments from its parent unread", disk.lv,
             bytes_read, device_bytes, "full read" if changed is None else f"{len(changed)} changed segments",
             summary.files_unmodified, len(segments),
             extra={"fields": {"bytes_read": bytes_read, "device_bytes": device_bytes,
                               "segments_unmodified": summary.files_unmodified,
                               "incremental": int(changed is not None)}})
    if changed is not None and summary.files_unmodified < len(segments) - len(changed):
        log.warning("restic re-read segments thin_delta reported unchanged (%d of %d taken unread)",
                    summary.files_unmodified, len(segments) - len(changed))
    snap = ctx.pools().lv(rec.lv)
    if snap is None or snap.thin_id is None or snap.pool_ref is None:
        raise StepError(f"the snapshot {rec.lv} vanished during its backup")
    new_base = Base(origin=str(disk.lv), origin_bytes=device_bytes, lv=str(rec.lv), thin_id=snap.thin_id,
                    pool=str(snap.pool_ref), segment_size=SEGMENT_SIZE, restic_snapshot=summary.snapshot_id,
                    mtimes_ns=tuple(s.mtime_ns for s in segments))
    return SegmentedBackup(summary, new_base, bytes_read, None if changed is None else len(changed))


def keep_base(ctx: Context, vm: VM, disk: Disk, run_id: str, base: Base) -> None:
    """Make the run's snapshot the next run's base and remove the one it replaces.

    The record is written first: a crash before the retag leaves the snapshot with its run tags, the
    cleanup removes it, and the next run finds the base gone and reads everything."""
    write_atomic(base_path(ctx, vm.name, disk.slug), base.to_json())
    tp = ctx.pools()
    ref = LvRef.parse(base.lv)
    tp.keep_as_base(ref, vm.name, run_id)
    for old in tp.bases(vm.name):
        if old.origin == disk.lv.name and old.vg == disk.lv.vg and old.name != ref.name:
            ctx.lvm.remove(old.ref, ctx.cfg.settings.lvremove_retries)
            log.info("removed the previous base %s of %s", old.ref, disk.lv)
    log.info("kept %s as the base of the next run of %s", ref, disk.lv)


