"""Failure alerts: OnFailure=xenbackup-notify@%N.service runs `xenbackup notify xenbackup@VM`."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .. import journal, names
from ..config import Config
from ..run import CommandError, mask_url, run
from ..systemd import unit_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FailureMessage:
    vm: str
    unit: str
    host: str
    result: str
    phase: str
    invocation_id: str
    time: float
    lines: list[str]

    def subject(self) -> str:
        return f"xenbackup: backup of {self.vm} on {self.host} failed in phase {self.phase} ({self.result})"

    def text(self) -> str:
        return "\n".join([self.subject(), "", f"unit: {self.unit}", f"invocation: {self.invocation_id}", "",
                          "last journal lines:", *self.lines]) + "\n"


def failing_phase(entries: list[dict[str, Any]]) -> str:
    """The phase of the last error before cleanup, else of the last record that names a phase."""
    # Cleanup always logs the final "failed" line; the phase that broke is the one before it.
    named = [e for e in entries if e.get("XENBACKUP_PHASE")]
    errors = [e for e in named if str(e.get("PRIORITY", "6")) <= "3"]
    for group in ([e for e in errors if e["XENBACKUP_PHASE"] != "cleanup"],
                  [e for e in named if e["XENBACKUP_PHASE"] != "cleanup"], errors):
        if group:
            return str(group[-1]["XENBACKUP_PHASE"])
    return "unknown"


def build_message(cfg: Config, instance: str, environ: Mapping[str, str] = os.environ) -> FailureMessage:
    unit = instance if instance.endswith(".service") else f"{instance}.service"
    vm = names.vm_of_unit(unit) or unit
    # systemd (251+) tells an OnFailure= unit which run failed. The unit's current state may already
    # belong to a newer run, started right after the failure.
    if environ.get("MONITOR_INVOCATION_ID") and environ.get("MONITOR_UNIT") == unit:
        invocation = environ["MONITOR_INVOCATION_ID"]
        result = environ.get("MONITOR_SERVICE_RESULT") or "unknown"
    else:
        state = unit_state(unit)
        invocation = state.invocation_id if state else ""
        result = state.result if state else "unknown"
    matches = [f"_SYSTEMD_INVOCATION_ID={invocation}"] if invocation else ["-u", unit]
    entries = journal.read_entries(matches, 40, cfg.command("journalctl"))
    if not entries and invocation:
        entries = journal.read_entries(["-u", unit], 40, cfg.command("journalctl"))
    lines = [str(e.get("MESSAGE", "")) for e in entries if isinstance(e.get("MESSAGE"), str)][-20:]
    return FailureMessage(vm=vm, unit=unit, host=socket.gethostname(), result=result,
                          phase=failing_phase(entries), invocation_id=invocation, time=time.time(), lines=lines)


def send(cfg: Config, msg: FailureMessage) -> list[str]:
    """Deliver msg through every configured channel once; returns the channels that failed."""
    n = cfg.notify
    body = json.dumps(asdict(msg)).encode()
    failed: list[str] = []
    if not (n.command or n.mail_to or n.webhook):
        log.warning("no notifier configured ([notify] command, mail_to or webhook); %s", msg.subject())
    if n.command:
        try:
            _run_with_input(list(n.command), body, n.timeout)
            log.info("notified through %s", n.command[0])
        except (CommandError, OSError) as exc:
            log.error("notifier command failed: %s", exc)
            failed.append("command")
    if n.mail_to:
        mail = (f"To: {n.mail_to}\nSubject: {msg.subject()}\nContent-Type: text/plain; charset=utf-8\n\n"
                f"{msg.text()}").encode()
        try:
            _run_with_input([n.sendmail, "-t", "-oi"], mail, n.timeout)
            log.info("mailed %s", n.mail_to)
        except (CommandError, OSError) as exc:
            log.error("sendmail to %s failed: %s", n.mail_to, exc)
            failed.append("mail")
    if n.webhook:
        req = urllib.request.Request(n.webhook, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "xenbackup"})
        try:
            with urllib.request.urlopen(req, timeout=n.timeout) as resp:
                log.info("webhook answered %s", resp.status)
        except (urllib.error.URLError, OSError) as exc:
            log.error("webhook %s failed: %s", mask_url(n.webhook), exc)
            failed.append("webhook")
    return failed


def _run_with_input(argv: list[str], data: bytes, timeout: float) -> None:
    import tempfile

    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        run(argv, stdin=f, timeout=timeout)
