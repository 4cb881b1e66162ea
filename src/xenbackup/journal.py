"""Logging: structured journald fields under systemd, human lines in a terminal."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from enum import StrEnum
from typing import Any

from . import names

IDENTIFIER = "xenbackup"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
VM: contextvars.ContextVar[str] = contextvars.ContextVar("xenbackup_vm", default="")
PHASE: contextvars.ContextVar[str] = contextvars.ContextVar("xenbackup_phase", default="")


class MessageId(StrEnum):
    """Events an operator cares about; each has an entry in the journald catalog."""

    STARTED = "f29c5be40ab94b71bc936a45de01b458"
    SUCCEEDED = "14a99ce9301e4006b02b2ce251777ef6"
    FAILED = "5b23e4b2994d43d79583bc826a29e2f8"
    STALE_REMOVED = "d219b7ba720d4e6b8d7b2a49544fedaf"
    OVERFLOW = "082d819371eb498e80e6253e19c6058c"
    RESTORED = "f73bc453af5d47fcbc1595ee61f2644c"
    EXTENDED = "728c0e799eb9423badef1d4434a899eb"


def event(logger: logging.Logger, level: int, msg: str, message_id: MessageId, *args: object,
          **fields: object) -> None:
    """Log an event an operator cares about, with its MESSAGE_ID and XENBACKUP_* fields."""
    logger.log(level, msg, *args, extra={"message_id": message_id.value, "fields": fields})


SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def syslog_priority(levelno: int) -> int:
    """Python logging level → syslog priority (0..7), which is what journald expects."""
    for level in sorted(SYSLOG_PRIORITY, reverse=True):
        if levelno >= level:
            return SYSLOG_PRIORITY[level]
    return 7


@contextlib.contextmanager
def context(vm: str | None = None, phase: str | None = None) -> Iterator[None]:
    """Tag every record logged inside the block with this VM and phase."""
    tokens = []
    if vm is not None:
        tokens.append((VM, VM.set(vm)))
    if phase is not None:
        tokens.append((PHASE, PHASE.set(phase)))
    try:
        yield
    except BaseException as exc:
        # The error is logged further out, after this block has ended; it keeps the innermost VM and phase.
        if not hasattr(exc, _CONTEXT_ATTR):
            with contextlib.suppress(AttributeError):
                setattr(exc, _CONTEXT_ATTR, {"vm": VM.get(), "phase": PHASE.get()})
        raise
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


_CONTEXT_ATTR = "_xenbackup_context"


def context_of(exc: BaseException) -> dict[str, str | None]:
    """The VM and phase an exception escaped from (see `context`), for logging it where it is caught."""
    found = getattr(exc, _CONTEXT_ATTR, None)
    return dict(found) if isinstance(found, dict) else {}


def unit_for(vm: str) -> str:
    """The service a VM's runs belong to, escaped as the timer names it (web-01 → xenbackup@web\\x2d01)."""
    return names.service(vm)


def journal_fields(record: logging.LogRecord) -> dict[str, str]:
    """The journald fields for one log record."""
    fields = {
        "MESSAGE": record.getMessage(),
        "PRIORITY": str(syslog_priority(record.levelno)),
        "SYSLOG_IDENTIFIER": IDENTIFIER,
        "CODE_FILE": record.pathname,
        "CODE_LINE": str(record.lineno),
        "CODE_FUNC": record.funcName,
        "LOGGER": record.name,
    }
    vm = getattr(record, "vm", None) or VM.get()
    phase = getattr(record, "phase", None) or PHASE.get()
    if vm:
        fields["XENBACKUP_VM"] = vm
        # journald attributes a datagram to a unit by the sender's cgroup, a lookup that can race
        # with a short-lived step's exit; journalctl -u also matches OBJECT_SYSTEMD_UNIT from root.
        fields["OBJECT_SYSTEMD_UNIT"] = unit_for(vm)
    if phase:
        fields["XENBACKUP_PHASE"] = phase
    message_id = getattr(record, "message_id", None)
    if message_id:
        fields["MESSAGE_ID"] = str(message_id)
    extra: Mapping[str, object] = getattr(record, "fields", None) or {}
    for key, value in extra.items():
        fields[f"XENBACKUP_{key.upper()}"] = str(value)
    if record.exc_info and record.exc_info[1] is not None and record.levelno >= logging.DEBUG:
        fields["ERRNO"] = str(getattr(record.exc_info[1], "errno", "") or "")
        if not fields["ERRNO"]:
            del fields["ERRNO"]
    return fields


class JournalHandler(logging.Handler):
    """Writes each record to journald through pystemd, with xenbackup's structured fields."""

    def __init__(self) -> None:
        super().__init__()
        from . import pystemd_modules  # lazily: unit tests and non-systemd hosts never import pystemd

        self._sendv = pystemd_modules.load("journal").sendv

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = journal_fields(record)
            if record.exc_info and logging.getLogger().isEnabledFor(logging.DEBUG):
                fields["MESSAGE"] += "\n" + logging.Formatter().formatException(record.exc_info)
            self._sendv(*(f"{k}={v}" for k, v in fields.items()))
        except Exception:
            self.handleError(record)


class TerminalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        vm = getattr(record, "vm", None) or VM.get()
        phase = getattr(record, "phase", None) or PHASE.get()
        where = ":".join(p for p in (vm, phase) if p)
        prefix = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "error: "}.get(
            record.levelno, "")
        text = f"{prefix}{record.getMessage()}"
        if record.exc_info and logging.getLogger().isEnabledFor(logging.DEBUG):
            text += "\n" + self.formatException(record.exc_info)
        return f"[{where}] {text}" if where else text


class SyslogPrefixFormatter(TerminalFormatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{syslog_priority(record.levelno)}>{super().format(record)}"


def under_journal() -> bool:
    """True when stderr is journald's stream (systemd sets JOURNAL_STREAM=dev:inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev or not ino:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == value


def setup(debug: bool = False, quiet: bool = False) -> None:
    """Configure logging once for the process."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handler: logging.Handler
    if under_journal():
        try:
            handler = JournalHandler()
        except ImportError:
            # Without pystemd, journald's stream still reads "<N>" as the priority.
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(SyslogPrefixFormatter())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(TerminalFormatter())
        if quiet:
            handler.setLevel(logging.WARNING)
        # What an admin runs by hand (a restore, a foreground backup) belongs in the journal too.
        if os.path.exists(JOURNAL_SOCKET):
            try:
                journal_handler = JournalHandler()
                journal_handler.setLevel(logging.INFO)
                root.addHandler(journal_handler)
            except ImportError:
                pass
    root.addHandler(handler)


def read_entries(matches: list[str], lines: int = 30, journalctl: str = "journalctl") -> list[dict[str, Any]]:
    """The last entries matching journalctl match arguments, as dicts."""
    from .run import run

    out = run([journalctl, "--no-pager", "-o", "json", "-n", str(lines), *matches], check=False)
    entries = []
    for line in out.stdout.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            entries.append(item)
    return entries
