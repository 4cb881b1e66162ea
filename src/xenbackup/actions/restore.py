"""`xenbackup restore`: stop the VM, restore over the original, verify, start it again."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from .. import hypervisor as hv_mod
from .. import journal, names
from ..journal import MessageId
from ..model import VM, Disk, DiskMode, LvRef
from ..mount import mounts
from ..repository import Snapshot
from ..run import run
from ..state import Busy, StateStore
from .context import Context, RestoreError, StepError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoreRequest:
    vm: str
    snapshot: str = "latest"
    to_path: str | None = None
    to_lv: LvRef | None = None
    disk: str | None = None
    flatten: bool = False
    includes: tuple[str, ...] = ()
    stop: bool = False
    start: bool = True
    with_config: bool = False
    delete: bool = False
    dry_run: bool = False
    shutdown_timeout: float = 120.0
    # Whose backups to restore: None is this host; another host's name recovers that host's VM here.
    host: str | None = None

    @property
    def in_place(self) -> bool:
        return self.to_path is None and self.to_lv is None


@dataclass(frozen=True)
class RunSelection:
    run_id: str
    disks: dict[str, Snapshot]
    config: Snapshot | None


@dataclass
class Outcome:
    steps: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)


# --- pure checks ------------------------------------------------------------------------------

def normalize_include(path: str, disk_path: str) -> str:
    """An --include path inside the disk's backed-up tree, as restic's absolute pattern; never '..'."""
    rel = path.lstrip("/")
    norm = os.path.normpath(rel) if rel else "."
    if norm == ".." or norm.startswith("../") or "\0" in path:
        raise RestoreError(f"--include {path!r} escapes the restored tree")
    base = "" if disk_path == "." else disk_path.strip("/")
    if base and (norm == base or norm.startswith(base + "/")):
        norm = norm[len(base):].lstrip("/") or "."
    joined = os.path.normpath(os.path.join("/", base, norm))
    return joined


def inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def select_run(snaps: Sequence[Snapshot], wanted: str) -> RunSelection:
    """The run a --snapshot names: 'latest', a run ID, or any restic snapshot ID of the run."""
    if not snaps:
        raise RestoreError("there is no backup of this VM in the repository")
    if wanted == "latest":
        run_id = max(snaps, key=lambda s: s.time).tag_value("run") or ""
    else:
        hits = [s for s in snaps if s.tag_value("run") == wanted] or [s for s in snaps if s.id.startswith(wanted)]
        if not hits:
            raise RestoreError(f"no backup of this VM has snapshot or run ID {wanted!r}")
        runs = {s.tag_value("run") or "" for s in hits}
        if len(runs) > 1:
            # Snapshots of one run share it; a prefix reaching into two runs could restore the wrong day.
            candidates = "; ".join(f"{s.short_id or s.id[:8]} (run {s.tag_value('run') or '?'}, {s.time}, "
                                   f"{s.tag_value('disk') or '?'})" for s in sorted(hits, key=lambda s: s.time))
            raise RestoreError(f"snapshot ID prefix {wanted!r} is ambiguous, it matches: {candidates}; "
                               "give more characters or the run ID")
        run_id = runs.pop()
    members = [s for s in snaps if (s.tag_value("run") or "") == run_id] if run_id else []
    disks = {d: s for s in members if (d := s.tag_value("disk")) and d != names.CONFIG_DISK}
    # Runs before the config rode along with a disk kept it in a restic snapshot of its own.
    config = next((s for s in members if s.tag_value("mode") == names.CONFIG_DISK), None) or next(
        (s for s in members if names.CONFIG_INSIDE in s.tags), None)
    return RunSelection(run_id=run_id, disks=disks, config=config)


def run_disks(ctx: Context, vm: VM, sel: RunSelection) -> list[Disk]:
    """The disks a restore of this run writes: the configured or discovered ones the run holds.

    A VM whose definition cannot be read here (its LVs are gone: disaster recovery on a new host) still has
    its block-mode disks, named by the run's own tags.
    """
    try:
        return list(ctx.disks(vm))
    except StepError as exc:
        if not vm.discovers_disks or not sel.disks:
            raise
        modes = {d: s.tag_value("mode") for d, s in sel.disks.items()}
        if any(m != DiskMode.BLOCK.value for m in modes.values()):
            raise RestoreError(f"{exc}; the run's files-mode disks need the VM's definition to find "
                               "their place") from None
        log.warning("%s; restoring the disks run %s recorded", exc, sel.run_id)
        return [Disk(lv=LvRef.parse(d), mode=DiskMode.BLOCK, source=f"run {sel.run_id}") for d in sel.disks]


# --- filesystem moves -------------------------------------------------------------------------

def _copy_dir_meta(src: str, dst: str) -> None:
    st = os.lstat(src)
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def merge_tree(src: str, dst: str) -> None:
    """Move src's entries over dst: files replace files, directories merge. Keeps hardlinks, xattrs."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        s_dir = os.path.isdir(s) and not os.path.islink(s)
        d_dir = os.path.isdir(d) and not os.path.islink(d)
        if s_dir and d_dir:
            merge_tree(s, d)
            continue
        if d_dir:
            shutil.rmtree(d)
        os.replace(s, d)
    _copy_dir_meta(src, dst)


def flatten_into(src: str, dst: str) -> list[str]:
    """Move every non-directory below src straight into dst ("original tree structure" off)."""
    entries: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(src):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            if name in entries:
                raise RestoreError(f"--flatten: {name!r} exists in two directories "
                                   f"({os.path.relpath(entries[name], src)} and "
                                   f"{os.path.relpath(os.path.join(dirpath, name), src)}); restore without it")
            entries[name] = os.path.join(dirpath, name)
    os.makedirs(dst, exist_ok=True)
    for name, path in entries.items():
        target = os.path.join(dst, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(path, target)
    return sorted(entries)


def relative_tree(root: str) -> dict[str, int]:
    """Every path below root with its size (-1 for directories)."""
    out: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = -1 if stat.S_ISDIR(st.st_mode) else st.st_size
    return out


def delete_extras(target: str, keep: dict[str, int]) -> list[str]:
    removed = []
    for rel in sorted(relative_tree(target), key=lambda r: r.count("/"), reverse=True):
        if rel not in keep:
            p = os.path.join(target, rel)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            elif os.path.lexists(p):
                os.unlink(p)
            removed.append(rel)
    return removed


# --- the restore ------------------------------------------------------------------------------

class Restorer:
    def __init__(self, ctx: Context, vm: VM, req: RestoreRequest,
                 hypervisor: hv_mod.Hypervisor | None = None, say: Callable[[str], None] | None = None) -> None:
        self.ctx = ctx
        self.vm = vm
        self.req = req
        self.hv = hypervisor or hv_mod.for_vm(vm, ctx.cfg.commands)
        self.say = say or (lambda text: None)
        self.outcome = Outcome()

    def step(self, phase: str, text: str) -> None:
        self.outcome.steps.append(f"[{phase}] {text}")
        if self.req.dry_run:
            self.say(f"[{phase}] {text}")
        else:
            with journal.context(phase=phase):
                log.info("%s", text)

    # --- checks before anything changes ---

    def disks(self, sel: RunSelection) -> list[Disk]:
        disks = run_disks(self.ctx, self.vm, sel)
        if self.req.disk:
            disks = [d for d in disks if str(d.lv) == self.req.disk or d.slug == self.req.disk]
            if not disks:
                raise RestoreError(f"{self.vm.name} has no disk {self.req.disk}")
        if (self.req.to_path or self.req.to_lv) and len(disks) > 1:
            raise RestoreError("--to/--to-lv restore one disk: choose it with --disk VG/LV")
        return disks

    def validate(self, sel: RunSelection, disks: list[Disk]) -> None:
        r = self.req
        if r.to_path and r.to_lv:
            raise RestoreError("--to and --to-lv exclude each other")
        if r.delete and r.includes:
            raise RestoreError("--delete with --include would delete everything not included; use one of them")
        for disk in disks:
            if str(disk.lv) not in sel.disks:
                raise RestoreError(f"run {sel.run_id} holds no backup of {disk.lv}")
            if disk.mode is DiskMode.BLOCK and (r.flatten or r.includes or r.to_path):
                raise RestoreError(f"{disk.lv} is a block-mode disk: --flatten, --include and --to apply to files")
            if disk.mode is DiskMode.FILES and r.to_lv:
                raise RestoreError(f"{disk.lv} is a files-mode disk: use --to PATH, not --to-lv")
            for inc in r.includes:
                normalize_include(inc, disk.path)
        if r.to_path:
            if not os.path.isabs(r.to_path):
                raise RestoreError(f"--to {r.to_path!r} must be an absolute path")
            repo = self.ctx.cfg.repository
            if repo.is_local and (inside(r.to_path, repo.url) or inside(repo.url, r.to_path)):
                raise RestoreError(f"--to {r.to_path} is inside the backup repository {repo.url}; refusing to "
                                   "write there")
        if r.with_config and sel.config is None:
            raise RestoreError(f"run {sel.run_id} saved no domain config")

    def files_target(self, disk: Disk) -> str:
        if self.req.to_path:
            return self.req.to_path
        device = os.path.realpath(disk.lv.path)
        for m in mounts():
            if m.source.startswith("/dev/") and os.path.realpath(m.source) == device:
                return os.path.normpath(os.path.join(m.target, disk.path))
        raise RestoreError(f"{disk.lv} is not mounted on this host, so its files have no place to go; mount it "
                           "or use --to PATH")

    def block_target(self, disk: Disk, snap: Snapshot) -> tuple[LvRef, tuple[str, ...], int]:
        ref = self.req.to_lv or disk.lv
        nodes = self.ctx.restic.ls(snap.id)
        if names.SEGMENTED_TAG in snap.tags:
            # A thin LV's changed-block backup: the device is its segment files in name order.
            parts = sorted((n for n in nodes if n.type == "file" and os.path.basename(n.path).startswith("seg-")),
                           key=lambda n: n.path)
            if not parts:
                raise RestoreError(f"snapshot {snap.short_id} is tagged {names.SEGMENTED_TAG} but holds no segments")
            files, size = tuple(n.path for n in parts), sum(n.size for n in parts)
        else:
            name = f"/{disk.slug}.img"
            found = next((n.size for n in nodes if n.path == name), None)
            if found is None:
                raise RestoreError(f"snapshot {snap.short_id} holds no {name}")
            files, size = (name,), found
        lv = self.ctx.lvm.lv(ref)
        if lv is None:
            raise RestoreError(f"target logical volume {ref} does not exist")
        if lv.size < size:
            raise RestoreError(f"target {ref} has {lv.size} bytes, smaller than the image's {size}; "
                               "extend it first (lvextend) or choose another --to-lv")
        return ref, files, size

    # --- the run ---

    def run_snapshots(self) -> list[Snapshot]:
        """The VM's snapshots of one host only: two hosts sharing a repository may both have a vm1."""
        tags = ["xenbackup", f"vm:{self.vm.name}"]
        host = self.req.host or self.ctx.host
        snaps = self.ctx.restic.snapshots(tags, host=host)
        if not snaps:
            others = sorted({s.hostname for s in self.ctx.restic.snapshots(tags, any_host=True)})
            if others:
                raise RestoreError(f"there is no backup of {self.vm.name} from host {host}; "
                                   f"{', '.join(others)} backed up a {self.vm.name}: to restore that, add "
                                   + " or ".join(f"--host {h}" for h in others))
        return snaps

    def run(self) -> Outcome:
        snaps = self.run_snapshots()
        sel = select_run(snaps, self.req.snapshot)
        disks = self.disks(sel)
        self.validate(sel, disks)
        targets = {str(d.lv): (self.files_target(d) if d.mode is DiskMode.FILES
                               else self.block_target(d, sel.disks[str(d.lv)])) for d in disks}
        running = self.hv.is_running(self.vm.name)
        if running and self.req.in_place and not self.req.stop:
            raise RestoreError(f"{self.vm.name} is running; an in-place restore would overwrite a live VM. "
                               "Add --stop to shut it down first (it is started again after a verified restore)")
        self.step("restore-check", f"restoring run {sel.run_id} of {self.vm.name}"
                  f" ({', '.join(s.short_id for s in sel.disks.values())})")
        with self._locked():
            if running and self.req.in_place:
                self.step("restore-stop", f"shutting down {self.vm.name} ({self.vm.hypervisor})")
                if not self.req.dry_run:
                    self.hv.shutdown(self.vm.name, self.req.shutdown_timeout)
            try:
                for disk in disks:
                    target = targets[str(disk.lv)]
                    snap = sel.disks[str(disk.lv)]
                    if isinstance(target, str):
                        self.restore_files(disk, snap, target)
                    else:
                        self.restore_block(snap, *target)
                if self.req.with_config and sel.config is not None and self.vm.domain_config:
                    self.restore_config(sel.config, self.vm.domain_config)
            except BaseException as exc:
                if running and self.req.in_place:
                    log.error("restore failed; %s stays stopped so that a half-restored disk is never booted",
                              self.vm.name)
                raise RestoreError(f"restore of {self.vm.name} failed: {exc}") from exc
            self._finish(running)
        return self.outcome

    def _finish(self, was_running: bool) -> None:
        if self.req.dry_run:
            if was_running and self.req.in_place and self.req.start:
                self.step("restore-start", f"starting {self.vm.name} again")
            return
        with journal.context(phase="restore-done"):
            log.info("restore of %s verified", self.vm.name,
                     extra={"message_id": MessageId.RESTORED.value, "fields": {"targets": self.outcome.restored}})
        if was_running and self.req.in_place and self.req.start:
            self.step("restore-start", f"starting {self.vm.name} again after the verified restore")
            self.hv.start(self.vm.name, self.vm.domain_config)
        elif was_running and self.req.in_place:
            self.step("restore-start", f"leaving {self.vm.name} stopped (--no-start)")
        elif self.req.in_place:
            self.step("restore-start", f"{self.vm.name} was not running before; leaving it stopped")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if self.req.dry_run:
            yield
            return
        store: StateStore = self.ctx.store
        with store.lock(self.vm.name, wait=False):
            state = store.load(self.vm.name)
            if state is not None and state.owner.alive():
                raise Busy(f"a backup of {self.vm.name} is running ({state.owner.describe()}); restore later")
            yield

    def restore_files(self, disk: Disk, snap: Snapshot, target: str) -> None:
        includes = [normalize_include(i, disk.path) for i in self.req.includes] or [
            normalize_include(".", disk.path)]
        how = "flattened into" if self.req.flatten else "over"
        self.step("restore-files", f"restic restore {snap.short_id} {' '.join(includes)} {how} {target}"
                  + (" (deleting files not in the backup)" if self.req.delete else ""))
        if self.req.dry_run:
            return
        os.makedirs(target, exist_ok=True)
        # Staging on the target's filesystem makes each final move a rename().
        staging = tempfile.mkdtemp(prefix=".xenbackup-restore-", dir=os.path.dirname(target.rstrip("/")) or "/")
        try:
            self.ctx.restic.restore(snap.id, staging, includes)
            root = os.path.join(staging, disk.path) if disk.path != "." else staging
            if not os.path.isdir(root):
                raise RestoreError(f"the backup holds nothing at {' '.join(includes)}")
            self._dig_holes(root)
            expected = relative_tree(root)
            if self.req.flatten:
                names = flatten_into(root, target)
                expected = {n: s for n, s in ((os.path.basename(k), v) for k, v in expected.items())
                            if n in names}
            else:
                merge_tree(root, target)
            self.step("restore-verify", f"checking {len(expected)} restored entries in {target}")
            found = relative_tree(target)
            bad = [k for k, size in expected.items() if found.get(k) != size]
            if bad:
                raise RestoreError(f"{len(bad)} restored entries differ in {target}, e.g. {bad[0]}")
            if self.req.delete:
                removed = delete_extras(target, expected)
                self.step("restore-files", f"deleted {len(removed)} entries not in the backup")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.outcome.restored.append(target)

    def _dig_holes(self, root: str) -> None:
        # restic 0.14 writes zeros back as data; punching them out again keeps sparse images sparse.
        for dirpath, _, files in os.walk(root):
            for name in files:
                p = os.path.join(dirpath, name)
                if not os.path.islink(p) and os.path.getsize(p) >= 4096:
                    st = os.stat(p)
                    run([self.ctx.cfg.command("fallocate"), "--dig-holes", p])
                    # Punching holes touches mtime; the restored file must keep the backed-up one.
                    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))

    def restore_block(self, snap: Snapshot, ref: LvRef, files: tuple[str, ...], size: int) -> None:
        shown = files[0] if len(files) == 1 else f"{os.path.dirname(files[0])} ({len(files)} segments in order)"
        self.step("restore-block", f"restic dump {snap.short_id} {shown} > {ref.path} ({size} bytes)")
        if self.req.dry_run:
            return
        lv = self.ctx.lvm.lv(ref)
        if lv is not None and lv.is_open:
            raise RestoreError(f"{ref} is open (a running VM or a mount uses it); stop the user first")
        stored = hashlib.sha256()
        written = 0
        fd = os.open(ref.path, os.O_WRONLY | os.O_EXCL)
        try:
            def sink(data: bytes) -> None:
                nonlocal written
                stored.update(data)
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                written += len(data)

            self.ctx.restic.dump_in_order(snap.id, files, sink)
            os.fsync(fd)
        finally:
            os.close(fd)
        if written != size:
            raise RestoreError(f"restic dump wrote {written} bytes, expected {size}")
        self.step("restore-verify", f"reading {ref} back to compare sha256 with the stored image")
        on_disk = hashlib.sha256()
        with open(ref.path, "rb", buffering=0) as dev:
            os.posix_fadvise(dev.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            left = size
            while left:
                data = dev.read(min(left, 1 << 20))
                if not data:
                    break
                on_disk.update(data)
                left -= len(data)
        if on_disk.hexdigest() != stored.hexdigest():
            raise RestoreError(f"{ref} does not read back as the stored image (sha256 {on_disk.hexdigest()[:16]} "
                               f"!= {stored.hexdigest()[:16]})")
        log.info("%s verified: sha256 %s", ref, stored.hexdigest(), extra={"fields": {"sha256": stored.hexdigest()}})
        self.outcome.restored.append(str(ref))

    def restore_config(self, snap: Snapshot, path: str) -> None:
        self.step("restore-config", f"restoring {path} from {snap.short_id}")
        if self.req.dry_run:
            return
        tmp = f"{path}.xenbackup-restore"
        with open(tmp, "wb") as f:

            def sink(data: bytes) -> None:
                f.write(data)

            self.ctx.restic.dump(snap.id, path, sink)
        os.replace(tmp, path)
        self.outcome.restored.append(path)
