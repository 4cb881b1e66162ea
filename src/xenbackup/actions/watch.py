"""The overflow guard: watch classic snapshots while restic reads them, extend them, fail on overflow."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from types import TracebackType

from ..journal import MessageId
from ..lvm import Lvm
from ..model import VM, LvRef, SizeKind, SnapshotRecord, SnapshotSize, format_bytes
from ..run import CommandError

log = logging.getLogger(__name__)


class SnapshotOverflowed(Exception):
    """A classic snapshot filled up; LVM invalidated it and what was read from it is worthless."""


class PoolFilling(SnapshotOverflowed):
    """A thin pool holding a snapshot is nearly full; the run stops before the pool (and the VM) stalls."""


def suggested_size(origin_size: int, cow_size: int, peak: float) -> SnapshotSize:
    """A COW size with headroom: twice what the run used, at least 10% of the origin."""
    used = cow_size * max(peak, 100.0) / 100
    want = max(int(used * 2), origin_size // 10)
    gib = 1 << 30
    return SnapshotSize(((want + gib - 1) // gib) * gib, SizeKind.BYTES)


class OverflowWatch:
    """A thread polling each classic snapshot's fill (`dmsetup status`) during the backup."""

    def __init__(self, lvm: Lvm, vm: VM, snapshots: Sequence[SnapshotRecord], interval: float,
                 on_abort: Callable[[], None] = lambda: None) -> None:
        self.lvm = lvm
        self.vm = vm
        self.snapshots = list(snapshots)
        self.interval = interval
        self.pool_threshold = vm.pool_threshold
        self.on_abort = on_abort
        self.peak = 0.0
        self.overflowed: list[str] = []
        self.pools_full: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="overflow-watch", daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> OverflowWatch:
        # The first look runs on the thread, beside restic's start, not before it: each second before restic
        # is a second more of the snapshot's life. A snapshot already invalid stops restic from there, and
        # check()'s last look, after restic, decides.
        if self.snapshots:
            self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            try:
                self.poll()
            except CommandError as exc:
                log.warning("cannot read snapshot fill: %s", exc)
            if self._stop.wait(self.interval):
                return

    def poll(self) -> None:
        with self._lock:
            for rec in self.snapshots:
                if rec.thin:
                    lv = self.lvm.lv(rec.lv)
                    if lv is not None:
                        self._poll_pool(rec, lv.pool)
                    continue
                status = self.lvm.snapshot_status(rec.lv)
                if status is None:
                    continue
                self.peak = max(self.peak, status.fill)
                if status.invalid or status.fill >= 100.0:
                    if str(rec.lv) not in self.overflowed:
                        self.overflowed.append(str(rec.lv))
                        self._report_overflow(rec)
                        self.on_abort()
                elif status.fill >= self.vm.overflow_threshold:
                    self._extend(rec, status.fill)

    def _poll_pool(self, rec: SnapshotRecord, pool_name: str) -> None:
        pool = self.lvm.lv(LvRef(rec.lv.vg, pool_name)) if pool_name else None
        if pool is None:
            return
        fill = max(pool.data_percent or 0.0, pool.metadata_percent or 0.0)
        self.peak = max(self.peak, fill)
        if fill >= self.pool_threshold and pool_name not in self.pools_full:
            self.pools_full.append(pool_name)
            log.error("thin pool %s/%s is %.1f%% full (data %.1f%%, metadata %.1f%%); stopping the backup and "
                      "removing its snapshot before the pool fills and stalls the VMs", rec.lv.vg, pool_name,
                      fill, pool.data_percent or 0.0, pool.metadata_percent or 0.0,
                      extra={"message_id": MessageId.OVERFLOW.value,
                             "fields": {"peak_fill": fill, "pool": f"{rec.lv.vg}/{pool_name}"}})
            self.on_abort()

    def _extend(self, rec: SnapshotRecord, fill: float) -> None:
        try:
            self.lvm.extend(rec.lv, self.vm.extend_step)
        except CommandError as exc:
            log.warning("snapshot %s is %.1f%% full and could not be extended: %s", rec.lv, fill, exc)
            return
        log.warning("snapshot %s was %.1f%% full; extended it by %s", rec.lv, fill, self.vm.extend_step,
                    extra={"message_id": MessageId.EXTENDED.value, "fields": {"fill": fill}})

    def _report_overflow(self, rec: SnapshotRecord) -> None:
        # Sizes for the hint come from LVM once, on this rare path; the kernel's counters do not carry them.
        try:
            lv = self.lvm.lv(rec.lv)
        except CommandError:
            lv = None
        origin_size, cow_size = (lv.origin_size, lv.size) if lv is not None else (0, 0)
        hint = suggested_size(origin_size, cow_size, 100.0)
        log.error("snapshot %s of %s overflowed (peak fill 100%%, COW %s); the backup is discarded. "
                  "Set snapshot_size = \"%s\" or larger for vm.%s", rec.lv, rec.origin, format_bytes(cow_size),
                  hint, self.vm.name,
                  extra={"message_id": MessageId.OVERFLOW.value,
                         "fields": {"peak_fill": 100, "suggested_size": str(hint), "snapshot": rec.lv}})

    def check(self) -> None:
        """Raise if any snapshot overflowed during the run (one last look first)."""
        if self.snapshots:
            self.poll()
        if self.pools_full and not self.overflowed:
            raise PoolFilling(f"thin pool {', '.join(self.pools_full)} nearly full during the backup")
        if self.overflowed:
            raise SnapshotOverflowed(f"snapshot {', '.join(self.overflowed)} overflowed during the backup")
