"""Progress reporting: a bar in a terminal, sd_notify STATUS and rate-limited journal lines under systemd."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from .model import format_bytes
from .repository import Progress

log = logging.getLogger(__name__)


def describe(p: Progress, label: str) -> str:
    parts = [label]
    if p.percent is not None:
        parts.append(f"{p.percent:.1f}%")
    parts.append(f"{format_bytes(p.bytes_done)}" + (f" of {format_bytes(p.total_bytes)}" if p.total_bytes else ""))
    # restic 0.14 estimates even when it does not know the total (a block device read from stdin, or an upload
    # throttled by --limit-upload), and then reports absurd values: only an estimate against a known total is shown.
    if p.seconds_remaining and p.total_bytes and p.seconds_remaining < ETA_LIMIT:
        hours, rest = divmod(p.seconds_remaining, 3600)
        minutes, seconds = divmod(rest, 60)
        parts.append(f"ETA {hours}:{minutes:02d}:{seconds:02d}" if hours else f"ETA {minutes}:{seconds:02d}")
    return ", ".join(parts)


ETA_LIMIT = 7 * 86400
"""Seconds; a longer estimate is noise (a backup that long would have hit the unit's TimeoutStartSec=)."""


class Reporter:
    """Turns restic status lines into the right kind of output for where we run."""

    def __init__(self, label: str, journal_interval: float, terminal: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.journal_interval = journal_interval
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.clock = clock
        self.started = clock()
        self._last_log = clock()
        self._last_notify = 0.0
        self._drawn = False

    def rate(self, p: Progress) -> str:
        elapsed = max(self.clock() - self.started, 0.001)
        return f"{format_bytes(p.bytes_done / elapsed)}/s"

    def __call__(self, p: Progress) -> None:
        now = self.clock()
        text = f"{describe(p, self.label)}, {self.rate(p)}"
        if self.terminal:
            width = 30
            filled = int(width * (p.percent or 0) / 100)
            bar = "#" * filled + "-" * (width - filled)
            sys.stderr.write(f"\r[{bar}] {text}\033[K")
            sys.stderr.flush()
            self._drawn = True
            return
        if now - self._last_notify >= 1:
            from . import systemd  # not before restic's first line: each import before it lengthens the snapshot's life

            systemd.notify_status(text)
            self._last_notify = now
        if now - self._last_log >= self.journal_interval:
            log.info("progress: %s", text)
            self._last_log = now

    def close(self) -> None:
        if self._drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._drawn = False
