"""Run state passed between unit steps, per-VM locks, and the persistent last-run record."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from . import names
from .model import Disk, DiskMode, LvRef, SnapshotRecord
from .run import mask_url

log = logging.getLogger(__name__)


class Busy(Exception):
    """Another run of the same VM holds it."""


class OwnerUnknown(Busy):
    """Whether the run holding a VM is alive cannot be told; it is treated as alive."""


@dataclass(frozen=True)
class Owner:
    """Who a run belongs to: a unit invocation (stable across its steps) or a foreground process."""

    invocation_id: str = ""
    pid: int = 0
    unit: str = ""

    @classmethod
    def current(cls) -> Owner:
        inv = os.environ.get("INVOCATION_ID", "")
        return cls(invocation_id=inv, unit=own_unit()) if inv else cls(pid=os.getpid())

    def alive(self) -> bool:
        if self.invocation_id:
            if self.invocation_id == os.environ.get("INVOCATION_ID", ""):
                return True
            if not self.unit:
                return False
            # A unit has one invocation at a time; the recorded one lives only while PID 1 says so.
            from .systemd import SystemdUnavailable, query_unit

            try:
                st = query_unit(self.unit)
            except SystemdUnavailable as exc:
                # "Cannot ask" must never read as "dead": a live run's snapshots would be swept under it.
                raise OwnerUnknown(f"cannot ask systemd whether {self.describe()} is alive: {exc}; "
                                   "not touching its snapshots") from exc
            return (st.invocation_id == self.invocation_id
                    and st.active_state in ("activating", "active", "deactivating", "reloading"))
        if self.pid:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        return False

    def describe(self) -> str:
        if self.invocation_id:
            return f"{self.unit or 'unit'} (invocation {self.invocation_id})"
        return f"process {self.pid}"


def own_unit(cgroup_file: str = "/proc/self/cgroup") -> str:
    """The unit we run in, from our cgroup path (systemd passes no unit name in the environment)."""
    try:
        with open(cgroup_file, encoding="utf-8") as f:
            for line in f:
                path = line.rstrip("\n").split(":", 2)[-1]
                last = path.rsplit("/", 1)[-1]
                if last.endswith(".service"):
                    return last
    except OSError:
        pass
    return ""


@dataclass(frozen=True)
class RunState:
    vm: str
    run_id: str
    owner: Owner
    started: float
    snapshots: tuple[SnapshotRecord, ...] = ()
    restic_snapshots: tuple[str, ...] = ()
    peak_fill: float = 0.0
    overflowed: bool = False
    phase: str = "snapshot"
    summary: dict[str, Any] = field(default_factory=dict)
    disks: tuple[Disk, ...] = ()
    """The disks this run backs up (configured or discovered), fixed at the snapshot step."""
    paused: str = ""
    """"pause" or "freeze" while xenbackup holds the guest still; cleanup resumes what this says."""
    pause_seconds: float | None = None
    consistency: str = ""
    snapshot_created: float | None = None
    """When the first lvcreate of this run began: every second a classic snapshot lives costs the VM's writes."""
    snapshot_seconds: float | None = None
    """From the first lvcreate until the last lvremove returned."""
    error: str = ""
    """Why a step failed, for cleanup's verdict: the step's own error lines may reach the journal after its
    process is gone, and then without the unit's name."""
    config_first: bool = False
    """The domain config is stored by the snapshot step, in the run that checks the repository's key, since
    no disk's run can carry it: the backup step stores disks only."""

    def to_json(self) -> str:
        data = asdict(self)
        data["snapshots"] = [
            {**asdict(s), "origin": str(s.origin)} for s in self.snapshots
        ]
        data["disks"] = [{**asdict(d), "lv": str(d.lv), "mode": d.mode.value} for d in self.disks]
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunState:
        d = json.loads(text)
        return cls(
            vm=d["vm"], run_id=d["run_id"], owner=Owner(**d["owner"]), started=d["started"],
            snapshots=tuple(SnapshotRecord(origin=LvRef.parse(s["origin"]), name=s["name"],
                                           disk_slug=s["disk_slug"], thin=s.get("thin", False),
                                           mountpoint=s.get("mountpoint")) for s in d.get("snapshots", [])),
            restic_snapshots=tuple(d.get("restic_snapshots", [])),
            peak_fill=float(d.get("peak_fill", 0.0)),
            overflowed=bool(d.get("overflowed", False)),
            phase=d.get("phase", "snapshot"),
            summary=d.get("summary", {}),
            disks=tuple(Disk(lv=LvRef.parse(x["lv"]), mode=DiskMode(x["mode"]), path=x.get("path", "."),
                             mount_options=tuple(x.get("mount_options", ())), source=x.get("source", "config"))
                        for x in d.get("disks", [])),
            paused=d.get("paused", ""),
            pause_seconds=d.get("pause_seconds"),
            consistency=d.get("consistency", ""),
            snapshot_created=d.get("snapshot_created"),
            snapshot_seconds=d.get("snapshot_seconds"),
            error=d.get("error", ""),
            config_first=bool(d.get("config_first", False)),
        )

    def with_snapshot(self, rec: SnapshotRecord) -> RunState:
        others = tuple(s for s in self.snapshots if s.name != rec.name)
        return replace(self, snapshots=(*others, rec))

    def with_stored(self, *snapshot_ids: str) -> RunState:
        """The run state once restic stored these snapshots, which cleanup forgets if the run cannot be trusted."""
        return replace(self, restic_snapshots=(*self.restic_snapshots, *snapshot_ids))


def write_atomic(path: str, text: str, mode: int = 0o600) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StateStore:
    """Files under runtime_dir/<vm>/ (the unit's RuntimeDirectory) and state_dir/."""

    def __init__(self, runtime_dir: str, state_dir: str) -> None:
        self.runtime_dir = runtime_dir
        self.state_dir = state_dir

    def vm_dir(self, vm: str) -> str:
        return os.path.join(self.runtime_dir, vm)

    def mount_root(self, vm: str) -> str:
        return os.path.join(self.vm_dir(vm), "mnt")

    def mountpoint(self, vm: str, slug: str) -> str:
        # The same path every run: restic finds its parent snapshot by path and skips unchanged files.
        return os.path.join(self.mount_root(vm), slug)

    def _run_path(self, vm: str) -> str:
        return os.path.join(self.vm_dir(vm), "state.json")

    def load(self, vm: str) -> RunState | None:
        try:
            with open(self._run_path(vm), encoding="utf-8") as f:
                return RunState.from_json(f.read())
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable run state of %s: %s", vm, exc)
            return None

    def save(self, state: RunState) -> None:
        write_atomic(self._run_path(state.vm), state.to_json())

    def clear(self, vm: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._run_path(vm))

    @contextlib.contextmanager
    def lock(self, vm: str, wait: bool = True) -> Iterator[None]:
        """The per-VM lock: an flock, so a crashed holder never leaves it taken."""
        path = os.path.join(self.runtime_dir, "locks", f"{vm}.lock")
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or not wait:
                    raise Busy(f"another xenbackup process holds the lock of {vm}") from None
                log.info("waiting for another xenbackup process working on %s", vm)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def repository_lock(self) -> contextlib.AbstractContextManager[None]:
        """Host-wide, around creating a local repository on first use: units of several VMs that start at once
        on a new host create it (and its password) once, and the others then find it there."""
        # A VM's name cannot start with a dot, so no VM's lock is this one.
        return self.lock(".repository")

    # --- persistent records ---

    def record_path(self, vm: str) -> str:
        return os.path.join(self.state_dir, f"{vm}.json")

    def write_record(self, vm: str, record: dict[str, Any]) -> None:
        write_atomic(self.record_path(vm), json.dumps(record, indent=1, sort_keys=True), mode=0o644)
        catalogue = os.path.join(self.state_dir, f"{vm}.runs.jsonl")
        with open(catalogue, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def read_record(self, vm: str) -> dict[str, Any] | None:
        try:
            with open(self.record_path(vm), encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else None
        except (FileNotFoundError, ValueError):
            return None

    def _repositories_path(self) -> str:
        return os.path.join(self.state_dir, "repositories.json")

    def restic_version_path(self) -> str:
        """Which restic binaries wait for locks themselves, asked once per binary (see Restic.has_retry_lock)."""
        return os.path.join(self.state_dir, "restic-version.json")

    def known_repositories(self) -> list[str]:
        """Repository URLs this host has stored backups in."""
        try:
            with open(self._repositories_path(), encoding="utf-8") as f:
                data = json.load(f)
        except (FileNotFoundError, ValueError):
            return []
        return [str(url) for url in data] if isinstance(data, list) else []

    def remember_repository(self, url: str) -> None:
        # The file is world-readable and only local paths are ever compared with it; a remote URL's
        # password stays out.
        url = mask_url(url)
        known = self.known_repositories()
        if url not in known:
            os.makedirs(self.state_dir, exist_ok=True)
            write_atomic(self._repositories_path(), json.dumps([*known, url], indent=1), mode=0o644)

    def run_records(self, vm: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        try:
            with open(os.path.join(self.state_dir, f"{vm}.runs.jsonl"), encoding="utf-8") as f:
                for line in f:
                    with contextlib.suppress(ValueError):
                        out.append(json.loads(line))
        except FileNotFoundError:
            pass
        return out


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"


class Slots:
    """At most max_parallel VMs hold snapshots at once, across all units and processes.

    A slot is a small file naming its owner. Claims happen under an flock, and a slot whose owner is
    no longer alive (a crashed run, a killed unit) is free again, so a crash never leaves one taken;
    /run is emptied by a reboot.
    """

    def __init__(self, runtime_dir: str, max_parallel: int) -> None:
        self.dir = os.path.join(runtime_dir, "slots")
        self.max_parallel = max_parallel

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def holders(self) -> dict[str, Owner]:
        out: dict[str, Owner] = {}
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.dir):
                if not name.endswith(".slot"):
                    continue
                try:
                    with open(os.path.join(self.dir, name), encoding="utf-8") as f:
                        out[name[:-5]] = Owner(**json.load(f))
                except (OSError, ValueError, TypeError):
                    continue
        return out

    def try_acquire(self, vm: str, owner: Owner) -> list[str]:
        """Take a slot for vm; returns [] on success, else the VMs holding the slots."""
        with self._guard():
            live = {}
            for name, holder in self.holders().items():
                if name == vm or not holder.alive():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.dir, f"{name}.slot"))
                else:
                    live[name] = holder
            if len(live) >= self.max_parallel:
                return sorted(live)
            write_atomic(os.path.join(self.dir, f"{vm}.slot"), json.dumps(asdict(owner)))
            return []

    def acquire(self, vm: str, owner: Owner, poll: float = 2.0,
                sleep: Callable[[float], None] = time.sleep) -> None:
        last_said: list[str] = []
        while holders := self.try_acquire(vm, owner):
            if holders != last_said:
                log.info("waiting for a snapshot slot: max_parallel=%d is held by %s", self.max_parallel,
                         ", ".join(f"{h} ({names.service(h)})" for h in holders))
                last_said = holders
            sleep(poll)

    def release(self, vm: str) -> None:
        with self._guard(), contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.dir, f"{vm}.slot"))
