"""`xenbackup list`: the backups in the repository, one row per run."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..repository import Snapshot


@dataclass(frozen=True)
class BackupRow:
    vm: str
    run_id: str
    time: str
    modes: tuple[str, ...]
    disks: tuple[str, ...]
    snapshot_ids: tuple[str, ...]
    size: int | None
    added: int | None

    def as_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "run": self.run_id, "time": self.time, "modes": list(self.modes),
                "disks": list(self.disks), "snapshots": list(self.snapshot_ids), "size": self.size,
                "added": self.added}


def group_runs(snapshots: Iterable[Snapshot], records: Mapping[str, Mapping[str, Any]]) -> list[BackupRow]:
    """Group restic snapshots into runs by their run: tag; sizes come from the local run records."""
    runs: dict[tuple[str, str], list[Snapshot]] = {}
    for snap in snapshots:
        vm = snap.tag_value("vm") or "?"
        run_id = snap.tag_value("run") or snap.short_id
        runs.setdefault((vm, run_id), []).append(snap)
    rows = []
    for (vm, run_id), snaps in runs.items():
        snaps.sort(key=lambda s: s.time)
        disks = tuple(d for s in snaps if (d := s.tag_value("disk")) and d != "config")
        modes = tuple(dict.fromkeys(m for s in snaps if (m := s.tag_value("mode"))))
        rec = records.get(run_id, {})
        rows.append(BackupRow(vm=vm, run_id=run_id, time=snaps[0].time[:19].replace("T", " "), modes=modes,
                              disks=disks, snapshot_ids=tuple(s.short_id for s in snaps),
                              size=rec.get("total_bytes"), added=rec.get("data_added")))
    rows.sort(key=lambda r: (r.vm, r.time))
    return rows
