"""Mount adapter: read-only snapshot mounts with the options each filesystem needs."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .run import CommandError, run

log = logging.getLogger(__name__)


class MountError(Exception):
    pass


@dataclass(frozen=True)
class MountEntry:
    source: str
    target: str
    fstype: str
    devnum: str = ""  # "major:minor" of the mounted filesystem, as mountinfo gives it
    root: str = "/"  # the directory of that filesystem mounted here ("/" unless a bind mount of a subtree)


def mount_options(fstype: str, journal_dirty: bool, extra: Sequence[str] = ()) -> list[str]:
    """Options for a read-only mount of a snapshot of a live filesystem."""
    opts = ["ro", "nodev", "nosuid", "noexec"]
    if fstype == "xfs":
        # The origin is mounted with the same UUID, and xfs refuses a second mount of a UUID;
        # norecovery because log replay would need a writable device and changes the snapshot.
        opts += ["nouuid", "norecovery"]
    elif fstype in ("ext3", "ext4") and journal_dirty:
        # A snapshot of a mounted ext4 has a journal that needs recovery; ro alone would replay it.
        opts += ["noload"]
    return opts + [o for o in extra if o not in opts]


EXT_SUPERBLOCK = 1024
EXT_SUPERBLOCK_END = EXT_SUPERBLOCK + 1024
EXT_MAGIC = 0xEF53
EXT_INCOMPAT_RECOVER = 0x0004  # dumpe2fs's "needs_recovery": the journal holds transactions not yet replayed


# Superblock fields, as e2fsprogs' ext2_fs.h and the kernel's xfs_format.h define them.
EXT_COMPAT_HAS_JOURNAL = 0x0004
EXT3_INCOMPAT = 0x0002 | 0x0004 | 0x0010  # filetype, recover, meta_bg: all an ext3 may have
EXT3_RO_COMPAT = 0x0001 | 0x0002 | 0x0004  # sparse_super, large_file, btree_dir
EXT_INCOMPAT_JOURNAL_DEV = 0x0008
EXT_FLAGS_TEST_FS = 0x0004
XFS_MAGIC = b"XFSB"


def superblock_fstype(head: bytes) -> str | None:
    """ext2, ext3, ext4 or xfs, told from the device's first 2 KiB as blkid tells them; None for anything
    else, or for a device that carries both signatures, which blkid then probes.

    A snapshot is mounted inside its own lifetime, and `blkid -p` is one more process there (about 0.1 s
    under emulation); these two are the filesystems of nearly every VM image."""
    sb = head[EXT_SUPERBLOCK:EXT_SUPERBLOCK_END]
    ext = len(sb) >= 0x68 and int.from_bytes(sb[0x38:0x3A], "little") == EXT_MAGIC
    xfs = head[:4] == XFS_MAGIC
    if ext == xfs:
        return None
    if xfs:
        return "xfs"
    compat, incompat, ro_compat = (int.from_bytes(sb[o:o + 4], "little") for o in (0x5C, 0x60, 0x64))
    if incompat & EXT_INCOMPAT_JOURNAL_DEV or int.from_bytes(sb[0x160:0x164], "little") & EXT_FLAGS_TEST_FS:
        return None  # an external journal (blkid: jbd), or a test filesystem (ext4dev)
    if not compat & EXT_COMPAT_HAS_JOURNAL:
        return "ext2" if not incompat & ~EXT3_INCOMPAT and not ro_compat & ~EXT3_RO_COMPAT else "ext4"
    return "ext3" if not incompat & ~EXT3_INCOMPAT and not ro_compat & ~EXT3_RO_COMPAT else "ext4"


def ext_needs_recovery(head: bytes) -> bool:
    """Whether an ext3/ext4 filesystem's journal needs recovery, from the device's first 2 KiB."""
    sb = head[EXT_SUPERBLOCK:EXT_SUPERBLOCK_END]
    if len(sb) < 0x64 or int.from_bytes(sb[0x38:0x3A], "little") != EXT_MAGIC:
        raise MountError("no ext2/3/4 superblock where blkid found one")
    return bool(int.from_bytes(sb[0x60:0x64], "little") & EXT_INCOMPAT_RECOVER)


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if not sep or len(parts) < 5 or len(rparts) < 2:
            continue
        entries.append(MountEntry(source=_unescape(rparts[1]), target=_unescape(parts[4]), fstype=rparts[0],
                                  devnum=parts[2], root=_unescape(parts[3])))
    return entries


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[MountEntry]:
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def mounts_below(prefix: str) -> list[MountEntry]:
    """Our mounts under prefix, deepest first so they can be unmounted in order."""
    prefix = prefix.rstrip("/") + "/"
    found = [m for m in mounts() if (m.target + "/").startswith(prefix)]
    return sorted(found, key=lambda m: m.target.count("/"), reverse=True)


def _read_head(device: str) -> bytes:
    with open(device, "rb", buffering=0) as dev:
        return dev.read(EXT_SUPERBLOCK_END)


class Mounter:
    def __init__(self, commands: Mapping[str, str]) -> None:
        self.cmd = commands

    @staticmethod
    def head(device: str) -> bytes:
        """The device's first 2 KiB, where ext2/3/4 and xfs keep what the mount needs; b"" when the device
        cannot be read: blkid says what is wrong with it, in its words."""
        try:
            return _read_head(device)
        except OSError:
            return b""

    def fstype(self, device: str, head: bytes = b"") -> str:
        """`head` as head() read it, when the caller has it already; read here otherwise."""
        known = superblock_fstype(head or self.head(device))
        if known is not None:
            return known
        # -p probes the device itself: a brand-new snapshot is not in the udev database yet.
        out = run([self.cmd["blkid"], "-p", "-o", "export", device], check=False)
        for line in out.stdout.splitlines():
            key, _, value = line.partition("=")
            if key == "TYPE":
                return value
        raise MountError(f"{device} holds no filesystem that blkid recognises; use mode = \"block\" for it")

    def journal_dirty(self, device: str, fstype: str, head: bytes = b"") -> bool:
        if fstype not in ("ext3", "ext4"):
            return False
        # One flag in the superblock: reading it costs a 2 KiB read where dumpe2fs cost a process.
        return ext_needs_recovery(head or _read_head(device))

    def mount_argv(self, device: str, target: str, fstype: str, options: Sequence[str]) -> list[str]:
        return [self.cmd["mount"], "-t", fstype, "-o", ",".join(options), device, target]

    def mount(self, device: str, target: str, extra: Sequence[str] = ()) -> MountEntry:
        head = self.head(device)
        fstype = self.fstype(device, head)
        opts = mount_options(fstype, self.journal_dirty(device, fstype, head), extra)
        os.makedirs(target, mode=0o700, exist_ok=True)
        try:
            run(self.mount_argv(device, target, fstype, opts))
        except CommandError as err:
            raise MountError(f"cannot mount {device} ({fstype}, {','.join(opts)}) on {target}: "
                             f"{err.stderr_tail or err.reason}") from err
        return MountEntry(device, target, fstype)

    def umount(self, target: str) -> bool:
        """Unmount target; False if nothing was mounted there."""
        if not any(m.target == target for m in mounts()):
            return False
        run([self.cmd["umount"], target])
        return True
