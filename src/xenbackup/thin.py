"""Changed-block incrementals of thin LVs: what thin_delta says changed, and which segment files restic must
read again. Pure logic; the commands live in lvm.py and the filesystem in segfs.py."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass

SEGMENT_SIZE = 16 * 1024 * 1024
"""Bytes per segment file: small enough that writes scattered over the disk leave most segments untouched
(10 % of a disk rewritten in 4 MiB clusters touched every 64 MiB segment, see BENCHMARKS.md), large enough
that a 500 GiB disk is a directory of 32000 files, which restic walks in a second."""

SECTOR = 512

# thin_delta's range elements: what is mapped in the base only, in the new snapshot only, in both to
# different data blocks, and in both to the same block. Unmapped in both is not listed (zeros in both).
_CHANGED = frozenset({"different", "left_only", "right_only"})
_KNOWN = _CHANGED | {"same"}


class DeltaError(Exception):
    """thin_delta's output cannot be trusted; the caller reads the whole device instead."""


@dataclass(frozen=True)
class Delta:
    block_bytes: int
    changed: tuple[tuple[int, int], ...]
    """(first block, block count) of every range whose data may differ."""

    @property
    def changed_bytes(self) -> int:
        return sum(n for _, n in self.changed) * self.block_bytes


def parse_delta(xml: str, base_id: int, new_id: int) -> Delta:
    """The changed ranges in `thin_delta -m --snap1 BASE --snap2 NEW` output (thin-provisioning-tools 0.9)."""
    import xml.etree.ElementTree as ET  # only a thin incremental run parses XML; every unit step imports this

    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise DeltaError(f"thin_delta printed XML xenbackup cannot read: {exc}") from None
    if root.tag != "superblock":
        raise DeltaError(f"thin_delta printed <{root.tag}>, expected <superblock>")
    try:
        block_bytes = int(root.attrib["data_block_size"]) * SECTOR
    except (KeyError, ValueError):
        raise DeltaError("thin_delta's <superblock> has no data_block_size") from None
    if block_bytes <= 0:
        raise DeltaError(f"thin_delta reports a data block size of {block_bytes} bytes")
    diffs = list(root)
    if len(diffs) != 1 or diffs[0].tag != "diff":
        raise DeltaError("thin_delta printed no single <diff> element")
    diff = diffs[0]
    if (diff.attrib.get("left"), diff.attrib.get("right")) != (str(base_id), str(new_id)):
        raise DeltaError(f"thin_delta compared devices {diff.attrib.get('left')} and {diff.attrib.get('right')}, "
                         f"not {base_id} and {new_id}")
    changed: list[tuple[int, int]] = []
    for el in diff:
        if el.tag not in _KNOWN:
            raise DeltaError(f"thin_delta printed an unknown range <{el.tag}>")
        try:
            begin, length = int(el.attrib["begin"]), int(el.attrib["length"])
        except (KeyError, ValueError):
            raise DeltaError(f"thin_delta's <{el.tag}> lacks a numeric begin or length") from None
        if begin < 0 or length <= 0:
            raise DeltaError(f"thin_delta printed an empty or negative range <{el.tag} begin={begin} "
                             f"length={length}>")
        if el.tag in _CHANGED:
            changed.append((begin, length))
    return Delta(block_bytes, tuple(changed))


def changed_segments(delta: Delta, segment_size: int = SEGMENT_SIZE) -> frozenset[int]:
    """The indexes of the segment files that hold at least one changed byte."""
    out: set[int] = set()
    for begin, length in delta.changed:
        first = begin * delta.block_bytes // segment_size
        last = ((begin + length) * delta.block_bytes - 1) // segment_size
        out.update(range(first, last + 1))
    return frozenset(out)


def segment_count(device_bytes: int, segment_size: int = SEGMENT_SIZE) -> int:
    return max(1, -(-device_bytes // segment_size))


def segment_length(index: int, device_bytes: int, segment_size: int = SEGMENT_SIZE) -> int:
    return max(0, min(segment_size, device_bytes - index * segment_size))


@dataclass(frozen=True)
class Segment:
    """One file of the FUSE view, with the metadata restic compares against its parent snapshot."""

    index: int
    offset: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Base:
    """What the last good run of a thin disk left for the next one to compare against."""

    origin: str
    """VG/LV of the disk."""
    origin_bytes: int
    lv: str
    """The kept thin snapshot (VG/LV), tagged xenbackup-base:VM."""
    thin_id: int
    pool: str
    """VG/POOL of the thin pool both the origin and the base live in."""
    segment_size: int
    restic_snapshot: str
    mtimes_ns: tuple[int, ...]
    """Per segment, the mtime restic stored; the same again tells restic the segment did not change."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Base:
        try:
            d = json.loads(text)
            base = cls(origin=str(d["origin"]), origin_bytes=int(d["origin_bytes"]), lv=str(d["lv"]),
                       thin_id=int(d["thin_id"]), pool=str(d["pool"]), segment_size=int(d["segment_size"]),
                       restic_snapshot=str(d["restic_snapshot"]),
                       mtimes_ns=tuple(int(m) for m in d["mtimes_ns"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise DeltaError(f"the recorded base cannot be read: {exc}") from None
        if len(base.mtimes_ns) != segment_count(base.origin_bytes, base.segment_size):
            raise DeltaError("the recorded base lists the wrong number of segments")
        return base


@dataclass(frozen=True)
class Facts:
    """What the run found on the host, to judge a recorded base by."""

    origin: str
    origin_bytes: int
    pool: str
    base_lv_exists: bool
    base_lv_origin: str
    """The origin LVM names for the base LV now ("" when it is gone or has none)."""
    base_thin_id: int | None
    parent_in_repository: bool


def parent_listed(recorded: str, snapshot_ids: Iterable[str]) -> bool:
    """Whether the restic snapshot a base recorded is still in the repository.

    restic 0.14's backup summary names a snapshot by its short id, `restic snapshots` by its full one."""
    return bool(recorded) and any(i.startswith(recorded) for i in snapshot_ids)


def why_not_incremental(base: Base | None, facts: Facts, segment_size: int = SEGMENT_SIZE) -> str | None:
    """None when the base may be compared against; otherwise why this run reads the whole device."""
    if base is None:
        return "no base from an earlier run"
    if base.origin != facts.origin:
        return f"the base was taken of {base.origin}, not {facts.origin}"
    if base.origin_bytes != facts.origin_bytes:
        return f"{facts.origin} changed size ({base.origin_bytes} → {facts.origin_bytes} bytes)"
    if base.segment_size != segment_size:
        return "the segment size changed"
    if base.pool != facts.pool:
        return f"{facts.origin} moved to thin pool {facts.pool}"
    if not facts.base_lv_exists:
        return f"the base snapshot {base.lv} is gone"
    if facts.base_lv_origin != facts.origin.split("/", 1)[-1]:
        return f"the base snapshot {base.lv} is not a snapshot of {facts.origin}"
    if facts.base_thin_id != base.thin_id:
        return f"the base snapshot {base.lv} has thin device id {facts.base_thin_id}, recorded {base.thin_id}"
    if not facts.parent_in_repository:
        return f"its restic snapshot {base.restic_snapshot[:8]} is no longer in the repository"
    return None


def plan_segments(device_bytes: int, now_ns: int, base: Base | None, changed: Iterable[int] | None,
                  segment_size: int = SEGMENT_SIZE) -> tuple[Segment, ...]:
    """Every segment with the mtime restic should see: the base's for unchanged ones, now for the rest.

    With no base or no delta (changed is None) every segment is new and restic reads all of them."""
    count = segment_count(device_bytes, segment_size)
    dirty = set(range(count)) if base is None or changed is None else set(changed)
    out = []
    for i in range(count):
        if i in dirty or base is None:
            mtime = now_ns
            # Two runs within one clock tick must still differ, or restic would skip a changed segment.
            if base is not None and i < len(base.mtimes_ns) and base.mtimes_ns[i] >= mtime:
                mtime = base.mtimes_ns[i] + 1
        else:
            mtime = base.mtimes_ns[i]
        out.append(Segment(i, i * segment_size, segment_length(i, device_bytes, segment_size), mtime))
    return tuple(out)
