"""The last-run record of each VM: what `xenbackup status`, `list` and the metrics read."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any

from ..model import VM
from ..state import RunState
from .context import Context

log = logging.getLogger(__name__)


class RunResult(StrEnum):
    """How a run ended: systemd's $SERVICE_RESULT values, and xenbackup's own verdicts."""

    SUCCESS = "success"
    PROTOCOL = "protocol"
    TIMEOUT = "timeout"
    EXIT_CODE = "exit-code"
    SIGNAL = "signal"
    CORE_DUMP = "core-dump"
    WATCHDOG = "watchdog"
    START_LIMIT_HIT = "start-limit-hit"
    RESOURCES = "resources"
    OOM_KILL = "oom-kill"
    EXEC_CONDITION = "exec-condition"
    UNKNOWN = "unknown"
    # xenbackup's own:
    OVERFLOW = "overflow"
    CLEANUP_FAILED = "cleanup-failed"
    INTERRUPTED = "interrupted"

    @classmethod
    def parse(cls, text: str | None) -> RunResult:
        try:
            return cls(text or "unknown")
        except ValueError:
            return cls.UNKNOWN


@dataclass(frozen=True)
class RunRecord:
    vm: str
    result: RunResult
    finished: float
    run_id: str = ""
    started: float | None = None
    duration: float | None = None
    peak_fill: float | None = None
    pause_seconds: float | None = None
    snapshot_seconds: float | None = None
    restic_seconds: float | None = None
    restic_snapshots: tuple[str, ...] = ()
    stale_snapshots: tuple[str, ...] = ()
    data_added: int | None = None
    total_bytes: int | None = None
    files: int | None = None
    last_success: float | None = None
    error: str = ""

    @classmethod
    def of_run(cls, vm: VM, state: RunState, result: RunResult, now: float) -> RunRecord:
        ok = result is RunResult.SUCCESS
        summary: dict[str, Any] = state.summary
        return cls(vm=vm.name, result=result, finished=now, run_id=state.run_id, started=state.started,
                   duration=now - state.started, peak_fill=state.peak_fill, pause_seconds=state.pause_seconds,
                   snapshot_seconds=state.snapshot_seconds, restic_seconds=summary.get("restic_seconds"),
                   restic_snapshots=state.restic_snapshots if ok else (),
                   data_added=summary.get("data_added"), total_bytes=summary.get("total_bytes"),
                   files=summary.get("files"), error="" if ok else state.error)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["result"] = self.result.value
        data["restic_snapshots"] = list(self.restic_snapshots)
        if not self.stale_snapshots:
            del data["stale_snapshots"]
        return data


def save_record(ctx: Context, record: RunRecord) -> RunRecord:
    """Write the VM's last-run record (keeping the time of the last success) and refresh the metrics."""
    previous = ctx.store.read_record(record.vm) or {}
    last = record.finished if record.result is RunResult.SUCCESS else previous.get("last_success")
    record = replace(record, last_success=last)
    ctx.store.write_record(record.vm, record.to_json())
    from .status import write_metrics  # the status table's code: only a run's end needs it

    try:
        write_metrics(ctx.cfg)
    except OSError as exc:
        log.warning("cannot write metrics file %s: %s", ctx.cfg.settings.metrics_file, exc)
    return record


def record_interrupted(ctx: Context, vm: VM, left: list[str]) -> None:
    """A run that left its snapshots behind never finished: its VM's record (status, metrics) says so."""
    save_record(ctx, RunRecord(vm=vm.name, result=RunResult.INTERRUPTED, finished=time.time(),
                               stale_snapshots=tuple(left)))


__all__ = ["RunRecord", "RunResult", "record_interrupted", "save_record"]
