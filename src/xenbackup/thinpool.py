"""Thin pool adapter: thin device ids (lvs), the pool's metadata snapshot (dmsetup), thin_delta, and the
tags that make a run's snapshot the next run's base (lvchange)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from . import names
from .lvm import MalformedReport, _rows, one_lv
from .model import LvRef
from .run import CommandError, run
from .thin import Delta, DeltaError, parse_delta

log = logging.getLogger(__name__)

THIN_FIELDS = "lv_name,vg_name,lv_attr,lv_size,origin,pool_lv,thin_id,lv_tags"


@dataclass(frozen=True)
class ThinLv:
    vg: str
    name: str
    size: int
    origin: str
    pool: str
    thin_id: int | None
    tags: tuple[str, ...]

    @property
    def ref(self) -> LvRef:
        return LvRef(self.vg, self.name)

    @property
    def pool_ref(self) -> LvRef | None:
        return LvRef(self.vg, self.pool) if self.pool else None


def parse_thin_lvs(stdout: str) -> list[ThinLv]:
    out = []
    for row in _rows("lvs", stdout, "lv"):
        try:
            thin_id = str(row.get("thin_id", "")).strip()
            out.append(ThinLv(vg=row["vg_name"], name=row["lv_name"], size=int(str(row["lv_size"]).rstrip("B")),
                              origin=row.get("origin", ""), pool=row.get("pool_lv", ""),
                              thin_id=int(thin_id) if thin_id else None,
                              tags=tuple(t for t in str(row.get("lv_tags", "")).split(",") if t)))
        except (KeyError, ValueError) as exc:
            raise MalformedReport("lvs", f"bad row {row!r}: {exc}") from None
    return out


def dm_name(ref: LvRef) -> str:
    """The device-mapper name LVM gives VG/LV: a '-' inside either name is doubled."""
    return f"{ref.vg.replace('-', '--')}-{ref.name.replace('-', '--')}"


class ThinPools:
    def __init__(self, commands: Mapping[str, str], state_dir: str) -> None:
        self.cmd = commands
        self.records = os.path.join(state_dir, "metadata-snapshots")

    # --- lvs ---

    def lvs(self, *selection: str) -> list[ThinLv]:
        argv = [self.cmd["lvs"], "--reportformat", "json", "--units", "b", "--nosuffix", "-o", THIN_FIELDS,
                *selection]
        return parse_thin_lvs(run(argv).stdout)

    def lv(self, ref: LvRef) -> ThinLv | None:
        return one_lv(self.lvs, ref)

    def bases(self, vm: str) -> list[ThinLv]:
        return self.lvs(f"@{names.lv_base_tag(vm)}")

    def keep_as_base(self, ref: LvRef, vm: str, run_id: str) -> None:
        """Retag a run's snapshot so that no cleanup removes it (they remove only xenbackup-vm: LVs)."""
        run([self.cmd["lvchange"], "--deltag", names.lv_vm_tag(vm), "--deltag", f"{names.TAG}-run:{run_id}",
             "--addtag", names.lv_base_tag(vm), str(ref)])

    # --- the pool's metadata snapshot ---

    def _record(self, pool: LvRef) -> str:
        return os.path.join(self.records, f"{pool.vg}+{pool.name}")

    def _message(self, pool: LvRef, text: str) -> None:
        run([self.cmd["dmsetup"], "message", f"{dm_name(pool)}-tpool", "0", text])

    @contextlib.contextmanager
    def metadata_snapshot(self, pool: LvRef) -> Iterator[str]:
        """Hold the pool's metadata snapshot; yields the metadata device thin_delta reads.

        A record file, locked while held, is written before the reservation: a run killed in between leaves
        it unlocked, and release_leftovers() (cleanup, sweep, the next run) releases the snapshot. A held
        metadata snapshot stays in the pool's metadata across reboots, so the record is in state_dir."""
        os.makedirs(self.records, mode=0o700, exist_ok=True)
        path = self._record(pool)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise DeltaError(f"another run holds the metadata snapshot of thin pool {pool}") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{pool}\n".encode())
            os.fsync(fd)
            try:
                self._message(pool, "reserve_metadata_snap")
            except CommandError as exc:
                os.unlink(path)
                raise DeltaError(f"cannot reserve the metadata snapshot of thin pool {pool} ({exc.cause()}); "
                                 "if another tool holds one, `dmsetup message "
                                 f"{dm_name(pool)}-tpool 0 release_metadata_snap` frees it") from None
            log.debug("holding the metadata snapshot of thin pool %s", pool)
            try:
                yield f"/dev/mapper/{dm_name(pool)}_tmeta"
            finally:
                self._message(pool, "release_metadata_snap")
                os.unlink(path)
                log.debug("released the metadata snapshot of thin pool %s", pool)
        finally:
            os.close(fd)

    def release_leftovers(self) -> list[str]:
        """Release the metadata snapshots a killed run left held; returns the pools released."""
        released: list[str] = []
        try:
            entries = sorted(os.listdir(self.records))
        except FileNotFoundError:
            return released
        for entry in entries:
            vg, sep, pool_name = entry.partition("+")
            if not sep:
                continue
            pool, path = LvRef(vg, pool_name), os.path.join(self.records, entry)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a live run holds it
                try:
                    self._message(pool, "release_metadata_snap")
                    log.warning("released the metadata snapshot of thin pool %s left held by an interrupted run",
                                pool)
                    released.append(str(pool))
                except CommandError as exc:
                    # Killed before the reservation, or the pool is gone: nothing is held.
                    log.info("no metadata snapshot of thin pool %s to release (%s)", pool, exc.cause())
                os.unlink(path)
            finally:
                os.close(fd)
        return released

    def delta(self, pool: LvRef, base_id: int, new_id: int) -> Delta:
        """What differs between two thin devices of one pool, read from a metadata snapshot."""
        with self.metadata_snapshot(pool) as metadata:
            try:
                out = run([self.cmd["thin_delta"], "-m", "--snap1", str(base_id), "--snap2", str(new_id),
                           metadata])
            except CommandError as exc:
                raise DeltaError(f"thin_delta failed: {exc}") from None
        return parse_delta(out.stdout, base_id, new_id)
