"""A read-only FUSE view of a block device as fixed-size segment files (pyfuse3).

restic skips a file whose size, inode, mtime and ctime equal its parent snapshot's node without reading it.
This filesystem gives every segment a stable inode and the mtime the caller planned, so restic reads only
the segments thin_delta reported changed, and the repository stays a plain restic repository."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from . import names
from .mount import mounts
from .thin import Segment

log = logging.getLogger(__name__)

ROOT_INODE = 1
# A segment's inode is fixed by its index: restic compares inodes with the parent snapshot's.
FIRST_SEGMENT_INODE = 16


# The kernel reads a FUSE file ahead in requests no larger than the mount's read-ahead (128 KiB by default),
# and each request is a round trip through this process: 4 MiB cuts the trips for restic's sequential reads.
READ_AHEAD_KIB = 4096


class SegmentFsError(Exception):
    pass


def raise_read_ahead(mountpoint: str, kib: int = READ_AHEAD_KIB, mountinfo: str = "/proc/self/mountinfo",
                     sysfs: str = "/sys/class/bdi") -> bool:
    """Set the FUSE mount's read-ahead through its backing device info (found without touching the mount,
    which may not be served yet). False, and logged, where it cannot be set: reads are then only slower."""
    try:
        devnum = next(m.devnum for m in mounts(mountinfo) if m.target == mountpoint)
        with open(os.path.join(sysfs, devnum, "read_ahead_kb"), "w", encoding="ascii") as f:
            f.write(str(kib))
        return True
    except (OSError, StopIteration) as exc:
        log.debug("cannot raise the read-ahead of %s: %r", mountpoint, exc)
        return False


def available() -> str | None:
    """None when a segment view can be mounted here, else why not."""
    try:
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401
    except ImportError as exc:
        return f"python3-pyfuse3 is not installed ({exc})"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (is the fuse module loaded?)"
    return None


def _operations(device: str, segments: Sequence[Segment], dir_mtime_ns: int) -> Any:
    import pyfuse3

    class SegmentOperations(pyfuse3.Operations):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
            self.by_name = {os.fsencode(names.segment_file(s.index)): s for s in segments}
            self.by_inode = {FIRST_SEGMENT_INODE + s.index: s for s in segments}
            self.bytes_read = 0

        def _attr(self, inode: int) -> Any:
            attr = pyfuse3.EntryAttributes()
            attr.st_ino = inode
            attr.st_uid = attr.st_gid = 0
            attr.st_nlink = 1
            attr.entry_timeout = attr.attr_timeout = 3600
            if inode == ROOT_INODE:
                attr.st_mode = stat.S_IFDIR | 0o500
                attr.st_nlink = 2
                attr.st_size = 0
                mtime = dir_mtime_ns
            else:
                seg = self.by_inode.get(inode)
                if seg is None:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                attr.st_mode = stat.S_IFREG | 0o400
                attr.st_size = seg.size
                attr.st_blksize = 1 << 20
                attr.st_blocks = -(-seg.size // 512)
                mtime = seg.mtime_ns
            # restic 0.14 also compares ctime, which only a filesystem can set; it follows the mtime here.
            attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = mtime
            return attr

        async def getattr(self, inode: int, ctx: Any = None) -> Any:
            return self._attr(inode)

        async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
            seg = self.by_name.get(name) if parent_inode == ROOT_INODE else None
            if seg is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(FIRST_SEGMENT_INODE + seg.index)

        async def opendir(self, inode: int, ctx: Any) -> int:
            if inode != ROOT_INODE:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            for seg in segments[start_id:]:
                if not pyfuse3.readdir_reply(token, os.fsencode(names.segment_file(seg.index)),
                                             self._attr(FIRST_SEGMENT_INODE + seg.index), seg.index + 1):
                    return

        async def open(self, inode: int, flags: int, ctx: Any) -> Any:
            if inode not in self.by_inode:
                raise pyfuse3.FUSEError(errno.EISDIR if inode == ROOT_INODE else errno.ENOENT)
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC):
                raise pyfuse3.FUSEError(errno.EROFS)
            return pyfuse3.FileInfo(fh=inode)

        async def read(self, fh: int, off: int, size: int) -> bytes:
            seg = self.by_inode[fh]
            size = max(0, min(size, seg.size - off))
            data = os.pread(self.fd, size, seg.offset + off) if size else b""
            self.bytes_read += len(data)
            return data

        async def release(self, fh: int) -> None:
            return None

        async def releasedir(self, fh: int) -> None:
            return None

        async def statfs(self, ctx: Any) -> Any:
            st = pyfuse3.StatvfsData()
            st.f_bsize = st.f_frsize = 512
            st.f_blocks = sum(-(-s.size // 512) for s in segments)
            st.f_files = len(segments) + 1
            st.f_namemax = 255
            return st

    return SegmentOperations()


@contextlib.contextmanager
def segment_view(device: str, mountpoint: str, segments: Sequence[Segment],
                 umount: Any) -> Iterator[Any]:
    """Serve the segments of device at mountpoint for the duration of the block; yields the operations
    object (its bytes_read counts what restic read). umount(path) ends the FUSE session from outside."""
    why = available()
    if why is not None:
        raise SegmentFsError(f"cannot show {device} as segments: {why}")
    import pyfuse3
    import trio

    ops = _operations(device, segments, max(s.mtime_ns for s in segments))
    os.makedirs(mountpoint, mode=0o700, exist_ok=True)
    # No default_permissions: root reads as root; 'ro' keeps the kernel from even asking to write.
    options = {"fsname=xenbackup-segments", "subtype=xenbackup", "ro"}
    pyfuse3.init(ops, mountpoint, options)
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            trio.run(pyfuse3.main)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=serve, name="segfs", daemon=True)
    thread.start()
    raise_read_ahead(mountpoint)
    try:
        yield ops
    finally:
        try:
            umount(mountpoint)
        finally:
            thread.join(timeout=30)
            with contextlib.suppress(Exception):
                pyfuse3.close(unmount=False)
            os.close(ops.fd)
    if failure:
        raise SegmentFsError(f"the segment view of {device} failed: {failure[0]}")
