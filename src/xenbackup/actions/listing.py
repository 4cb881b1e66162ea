"""`xenbackup list`: the backups in the repository, one row per run."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import names
from ..model import format_bytes
from ..repository import Snapshot


@dataclass(frozen=True)
class BackupRow:
    host: str
    vm: str
    run_id: str
    time: str
    modes: tuple[str, ...]
    disks: tuple[str, ...]
    snapshot_ids: tuple[str, ...]
    size: int | None
    added: int | None

    def as_json(self) -> dict[str, Any]:
        return {"host": self.host, "vm": self.vm, "run": self.run_id, "time": self.time, "modes": list(self.modes),
                "disks": list(self.disks), "snapshots": list(self.snapshot_ids), "size": self.size,
                "added": self.added}


def group_runs(snapshots: Iterable[Snapshot], records: Mapping[str, Mapping[str, Any]]) -> list[BackupRow]:
    """Group restic snapshots into runs by their run: tag; sizes come from the local run records."""
    runs: dict[tuple[str, str, str], list[Snapshot]] = {}
    for snap in snapshots:
        vm = snap.tag_value("vm") or "?"
        run_id = snap.tag_value("run") or snap.short_id
        runs.setdefault((snap.hostname, vm, run_id), []).append(snap)
    rows = []
    for (host, vm, run_id), snaps in runs.items():
        snaps.sort(key=lambda s: s.time)
        disks = tuple(d for s in snaps if (d := s.tag_value("disk")) and d != "config")
        modes = tuple(dict.fromkeys(m for s in snaps if (m := s.tag_value("mode"))))
        if "config" not in modes and any(names.CONFIG_INSIDE in s.tags for s in snaps):
            modes = (*modes, "config")
        rec = records.get(run_id, {})
        rows.append(BackupRow(host=host, vm=vm, run_id=run_id, time=snaps[0].time[:19].replace("T", " "), modes=modes,
                              disks=disks, snapshot_ids=tuple(s.short_id for s in snaps),
                              size=rec.get("total_bytes"), added=rec.get("data_added")))
    rows.sort(key=lambda r: (r.host, r.vm, r.time))
    return rows


def render_table(rows: Iterable[BackupRow], with_host: bool) -> str:
    """The `xenbackup list` table; a HOST column when the listing spans other hosts than this one."""
    host_head = f"{'HOST':<16} " if with_host else ""
    lines = [f"{host_head}{'VM':<16} {'TIME (UTC)':<19}  {'MODE':<12} {'SIZE':>10} {'ADDED':>10}  SNAPSHOTS"]
    for r in rows:
        size = format_bytes(r.size) if r.size is not None else "-"
        added = format_bytes(r.added) if r.added is not None else "-"
        host = f"{r.host:<16} " if with_host else ""
        lines.append(f"{host}{r.vm:<16} {r.time:<19}  {'+'.join(r.modes):<12} {size:>10} {added:>10}  "
                     f"{' '.join(r.snapshot_ids)}")
    if len(lines) == 1:
        lines.append("(no backups)")
    return "\n".join(lines)
