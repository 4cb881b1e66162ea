"""`xenbackup status` and the Prometheus textfile: what ran, how it went, what runs next."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .. import names
from ..config import Config
from ..state import StateStore, write_atomic
from ..systemd import TimerState, UnitState


@dataclass(frozen=True)
class VmStatus:
    vm: str
    result: str
    last_run: float | None
    last_success: float | None
    duration: float | None
    bytes_added: int | None
    bytes_total: int | None
    files: int | None
    peak_fill: float | None
    next_run: float | None
    unit_result: str
    unit_exit_status: int | None
    active_state: str
    stale: bool
    error: str = ""
    """Why the last run failed, as its cleanup recorded it."""

    @property
    def ok(self) -> bool:
        return self.result in ("success", "never") and not self.stale

    def as_json(self) -> dict[str, Any]:
        # Every field is a plain value: asdict's deep copy of each cost more than the rest of status together.
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "ok": self.ok}


def _usec(value: int) -> float | None:
    # systemd reports "never" as 0 and "infinity" as 2^64-1.
    return value / 1e6 if 0 < value < (1 << 63) else None


def vm_status(name: str, record: Mapping[str, Any] | None, unit: UnitState | None, timer: TimerState | None,
              max_age_hours: int, now: float) -> VmStatus:
    """Combine our own last-run record with PID 1's view of the unit and its timer."""
    rec = record or {}
    result = str(rec.get("result") or "never")
    last_run = rec.get("finished")
    if unit is not None and unit.result and unit.result != "success" and unit.inactive_enter_usec:
        # PID 1 saw a failure after our record was written (e.g. a pre step died before cleanup wrote it).
        enter = _usec(unit.inactive_enter_usec)
        if enter is not None and (last_run is None or enter > float(last_run) + 5):
            result, last_run = unit.result, enter
    last_success = rec.get("last_success")
    stale = last_success is None or now - float(last_success) > max_age_hours * 3600
    return VmStatus(
        vm=name, result=result, last_run=last_run, last_success=last_success, duration=rec.get("duration"),
        bytes_added=rec.get("data_added"), bytes_total=rec.get("total_bytes"), files=rec.get("files"),
        peak_fill=rec.get("peak_fill"),
        next_run=_usec(timer.next_elapse_usec) if timer else None,
        unit_result=unit.result if unit else "", unit_exit_status=unit.exec_main_status if unit else None,
        active_state=unit.active_state if unit else "", stale=stale and result != "never",
        error=str(rec.get("error") or "") if result != "success" else "",
    )


def collect(cfg: Config, units: Mapping[str, UnitState | None], timers: Mapping[str, TimerState],
            now: float | None = None) -> list[VmStatus]:
    now = time.time() if now is None else now
    store = StateStore(cfg.settings.runtime_dir, cfg.settings.state_dir)
    out = []
    for name in sorted(cfg.vms):
        out.append(vm_status(name, store.read_record(name), units.get(names.service(name)),
                             timers.get(names.timer(name)), cfg.settings.max_age_hours, now))
    return out


def _fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def render_table(rows: list[VmStatus]) -> str:
    from ..model import format_bytes

    lines = [f"{'VM':<16} {'RESULT':<14} {'LAST RUN':<16} {'TOOK':>6} {'ADDED':>10} {'TOTAL':>10} "
             f"{'PEAK':>5} {'NEXT RUN':<16}"]
    for r in rows:
        took = f"{r.duration:.0f}s" if r.duration is not None else "-"
        added = format_bytes(r.bytes_added) if r.bytes_added is not None else "-"
        total = format_bytes(r.bytes_total) if r.bytes_total is not None else "-"
        peak = f"{r.peak_fill:.0f}%" if r.peak_fill is not None else "-"
        result = r.result + (" (old)" if r.stale else "")
        lines.append(f"{r.vm:<16} {result:<14} {_fmt_time(r.last_run):<16} {took:>6} {added:>10} {total:>10} "
                     f"{peak:>5} {_fmt_time(r.next_run):<16}")
    return "\n".join(lines)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


METRICS = (
    ("xenbackup_last_success_timestamp_seconds", "gauge", "Unix time of the last successful backup.",
     "last_success"),
    ("xenbackup_last_run_timestamp_seconds", "gauge", "Unix time the last run finished.", "finished"),
    ("xenbackup_last_run_duration_seconds", "gauge", "Duration of the last run.", "duration"),
    ("xenbackup_last_run_bytes_added", "gauge", "New bytes the last run added to the repository.", "data_added"),
    ("xenbackup_last_run_bytes_processed", "gauge", "Bytes the last run read.", "total_bytes"),
    ("xenbackup_last_run_files", "gauge", "Files the last run processed.", "files"),
    ("xenbackup_snapshot_peak_fill_percent", "gauge", "Peak fill of the last run's snapshots.", "peak_fill"),
    ("xenbackup_last_pause_seconds", "gauge", "How long the last run kept the guest paused or frozen.",
     "pause_seconds"),
    ("xenbackup_last_snapshot_seconds", "gauge",
     "How long the last run's snapshots existed, from the first lvcreate to the last lvremove.", "snapshot_seconds"),
    ("xenbackup_last_restic_seconds", "gauge", "restic's own time for the last run's backups.", "restic_seconds"),
)


def render_metrics(records: Mapping[str, Mapping[str, Any] | None]) -> str:
    lines: list[str] = []
    for metric, kind, text, key in METRICS:
        lines += [f"# HELP {metric} {text}", f"# TYPE {metric} {kind}"]
        for vm, rec in sorted(records.items()):
            if rec and rec.get(key) is not None:
                # repr keeps every digit; %g would round a Unix timestamp to the nearest 100 s.
                lines.append(f'{metric}{{vm="{_escape_label(vm)}"}} {float(rec[key])!r}')
    lines += ["# HELP xenbackup_last_run_success 1 if the last run succeeded.",
              "# TYPE xenbackup_last_run_success gauge"]
    for vm, rec in sorted(records.items()):
        if rec:
            ok = 1 if rec.get("result") == "success" else 0
            lines.append(f'xenbackup_last_run_success{{vm="{_escape_label(vm)}",'
                         f'result="{_escape_label(str(rec.get("result")))}"}} {ok}')
    return "\n".join(lines) + "\n"


def write_metrics(cfg: Config) -> str | None:
    path = cfg.settings.metrics_file
    if not path:
        return None
    store = StateStore(cfg.settings.runtime_dir, cfg.settings.state_dir)
    text = render_metrics({name: store.read_record(name) for name in cfg.vms})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # node_exporter may read at any moment: write a temp file and rename it into place.
    write_atomic(path, text, mode=0o644)
    return path
