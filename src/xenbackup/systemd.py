"""pystemd adapter: sd_notify and unit properties. Bytes from D-Bus never leave this module."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import names

log = logging.getLogger(__name__)


def notify_status(text: str) -> None:
    """Show text in `systemctl status`; a no-op outside a unit with NotifyAccess."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        from .pystemd_modules import load

        load("daemon").notify(False, f"STATUS={text}")
    except Exception as exc:  # progress reporting must never break a backup
        log.debug("sd_notify failed: %s", exc)


@dataclass(frozen=True)
class UnitState:
    name: str
    load_state: str
    active_state: str
    result: str
    exec_main_status: int | None
    invocation_id: str
    inactive_exit_usec: int
    inactive_enter_usec: int


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class SystemdUnavailable(Exception):
    """PID 1 could not be asked (no system bus, D-Bus error): the unit's state is unknown, not "dead"."""


def query_unit(name: str, bus: Any = None) -> UnitState:
    """The unit's properties from PID 1 over D-Bus; raises SystemdUnavailable when it cannot be asked."""
    try:
        from .pystemd_modules import load

        unit = load("systemd1").Unit(name.encode(), bus=bus)
        unit.load()
        svc = unit.Service
        return UnitState(
            name=name,
            load_state=_text(unit.Unit.LoadState),
            active_state=_text(unit.Unit.ActiveState),
            result=_text(svc.Result),
            exec_main_status=int(svc.ExecMainStatus) if svc.ExecMainPID or svc.ExecMainStatus else None,
            invocation_id=bytes(unit.Unit.InvocationID).hex() if unit.Unit.InvocationID else "",
            inactive_exit_usec=int(unit.Unit.InactiveExitTimestamp),
            inactive_enter_usec=int(unit.Unit.InactiveEnterTimestamp),
        )
    except Exception as exc:
        raise SystemdUnavailable(f"cannot read {name} over D-Bus: {exc}") from exc


SHOW_UNIT = ("Id", "LoadState", "ActiveState", "Result", "ExecMainStatus", "ExecMainPID", "InvocationID",
             "InactiveExitTimestamp", "InactiveEnterTimestamp")
# A service and a timer in one show: each prints the properties it has.
SHOW_OVERVIEW = (*SHOW_UNIT, "NextElapseUSecRealtime", "LastTriggerUSec")


def parse_show(stdout: str) -> list[dict[str, str]]:
    """`systemctl show` of several units: one block of Name=value lines per unit, blocks split by a blank line."""
    blocks: list[dict[str, str]] = [{}]
    for line in stdout.splitlines():
        if not line.strip():
            if blocks[-1]:
                blocks.append({})
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"systemctl show printed {line!r}")
        blocks[-1][key] = value
    return [b for b in blocks if b]


def _show_usec(value: str) -> int:
    """A timestamp as `systemctl show` prints it, in µs; empty or "n/a" is never (0).

    `--timestamp=unix` gives "@1764468000" for the *Timestamp properties only: systemd 252 prints a timer's
    NextElapseUSecRealtime and LastTriggerUSec in its default style, "Mon 2026-12-07 03:15:00 UTC" under the
    TZ=UTC that _show sets."""
    if value in ("", "n/a"):
        return 0
    if value.startswith("@"):
        return int(float(value[1:]) * 1_000_000)
    words = value.split()
    if len(words) != 4 or words[3] != "UTC":
        raise ValueError(f"not a timestamp: {value!r}")
    import calendar

    date, clock = words[1].split("-"), words[2].split(":")
    if len(date) != 3 or len(clock) != 3:
        raise ValueError(f"not a timestamp: {value!r}")
    return calendar.timegm((*map(int, date), *map(int, clock), 0, 0, 0)) * 1_000_000


def _unit_from_show(b: dict[str, str]) -> UnitState:
    status, pid = int(b.get("ExecMainStatus") or 0), int(b.get("ExecMainPID") or 0)
    return UnitState(name=b["Id"], load_state=b["LoadState"], active_state=b["ActiveState"],
                     result=b.get("Result", ""), exec_main_status=status if pid or status else None,
                     invocation_id=b.get("InvocationID", "").replace("-", ""),
                     inactive_exit_usec=_show_usec(b.get("InactiveExitTimestamp", "")),
                     inactive_enter_usec=_show_usec(b.get("InactiveEnterTimestamp", "")))


def _show(systemctl: str, properties: Sequence[str], units: Sequence[str]) -> list[dict[str, str]]:
    from .run import run

    return parse_show(run([systemctl, "show", "--all", "--timestamp=unix", "-p", ",".join(properties),
                           "--", *units], env={"TZ": "UTC"}).stdout)


def not_loaded(name: str) -> UnitState:
    """A unit PID 1 does not hold: it has not failed or run since it was garbage-collected, so it is what
    `systemctl show` says of it after loading it: inactive, result "success", no timestamps."""
    return UnitState(name=name, load_state="stub", active_state="inactive", result="success", exec_main_status=None,
                     invocation_id="", inactive_exit_usec=0, inactive_enter_usec=0)


def _system_bus() -> Any:
    """An open pystemd connection to the system bus, or None (logged) when there is none."""
    try:
        from .pystemd_modules import load

        bus = load("dbuslib").DBus()
        bus.open()
        return bus
    except Exception as exc:
        log.debug("cannot open the system bus: %s", exc)
        return None


def overview(services: Sequence[str], systemctl: str = "systemctl") -> tuple[dict[str, UnitState | None],
                                                                          dict[str, TimerState]]:
    """unit_state of each service, and every loaded xenbackup timer, from one `systemctl show`.

    `xenbackup status` asks for every VM's: over pystemd each unit cost an introspection and a call per
    property (25 s for 100 VMs under emulation). The show names patterns, not units: a named unit is loaded
    by PID 1 to be shown (100 template instances took 10 s under emulation), and a pattern matches only the
    units PID 1 holds. One that it does not hold has not failed or run since it was garbage-collected.
    """
    from .run import CommandError

    try:
        blocks = _show(systemctl, SHOW_OVERVIEW, [names.SERVICE_PATTERN, names.TIMER_PATTERN])
        found = {b["Id"]: _unit_from_show(b) for b in blocks if b["Id"].endswith(".service")}
        timers = {b["Id"]: _timer_from_show(b) for b in blocks if b["Id"].endswith(".timer")}
        return {name: found.get(name) or not_loaded(name) for name in services}, timers
    except (CommandError, KeyError, ValueError) as exc:
        log.debug("systemctl show failed (%s); asking over D-Bus", exc)
    return _units_over_dbus(services), _timers_over_dbus(names.TIMER_PATTERN)


def _units_over_dbus(units: Sequence[str]) -> dict[str, UnitState | None]:
    if not units:
        return {}
    bus = _system_bus()
    if bus is None:
        return dict.fromkeys(units)
    try:
        out: dict[str, UnitState | None] = {}
        for name in units:
            try:
                out[name] = query_unit(name, bus)
            except SystemdUnavailable as exc:
                log.debug("%s", exc)
                out[name] = None
        return out
    finally:
        bus.close()


def unit_state(name: str) -> UnitState | None:
    """Like query_unit, or None where PID 1 cannot be asked; only for reports that may show "unknown"."""
    try:
        return query_unit(name)
    except SystemdUnavailable as exc:
        log.debug("%s", exc)
        return None


def calendar_error(expr: str, analyze: str = "systemd-analyze") -> str | None:
    """None if systemd accepts the calendar expression, else its complaint."""
    from .run import CommandError

    try:
        return calendar_errors([expr], analyze).get(expr)
    except CommandError as exc:
        return str(exc)


def _complaint(stderr: str, returncode: int) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"systemd-analyze exited {returncode}"


def calendar_errors(exprs: Sequence[str], analyze: str = "systemd-analyze") -> dict[str, str]:
    """systemd's complaint about each bad calendar expression, from one `systemd-analyze calendar A B C`.

    Raises CommandError when systemd-analyze cannot be run at all.
    """
    from .run import run

    exprs = list(dict.fromkeys(exprs))
    if not exprs:
        return {}
    out = run([analyze, "calendar", *exprs], check=False)
    if out.returncode == 0:
        return {}
    # systemd-analyze checks every argument and names each bad one: "... specification 'X': reason".
    bad = {}
    for line in out.stderr.splitlines():
        for expr in exprs:
            if f"'{expr}'" in line:
                bad[expr] = line.strip()
    if bad:
        return bad
    if len(exprs) == 1:
        return {exprs[0]: _complaint(out.stderr or out.stdout, out.returncode)}
    # An older systemd that words it differently: ask about each one alone.
    return {e: why for e in exprs for why in calendar_errors([e], analyze).values()}


def timespan_errors(spans: Sequence[str], analyze: str = "systemd-analyze") -> dict[str, str]:
    """systemd's complaint about each bad time span; raises CommandError if systemd-analyze cannot run."""
    from .run import run

    todo = list(dict.fromkeys(spans))
    bad: dict[str, str] = {}
    # `systemd-analyze timespan` stops at the first bad argument, so the rest is asked again after it.
    while todo:
        out = run([analyze, "timespan", *todo], check=False)
        if out.returncode == 0:
            break
        judged = [line.split(":", 1)[1].strip() for line in out.stdout.splitlines()
                  if line.startswith("Original:")]
        first_bad = len(judged)
        if first_bad >= len(todo):
            break
        bad[todo[first_bad]] = _complaint(out.stderr, out.returncode)
        todo = todo[first_bad + 1:]
    return bad


@dataclass(frozen=True)
class TimerState:
    name: str
    next_elapse_usec: int
    last_trigger_usec: int


def _timer_from_show(b: dict[str, str]) -> TimerState:
    return TimerState(name=b["Id"], next_elapse_usec=_show_usec(b.get("NextElapseUSecRealtime", "")),
                      last_trigger_usec=_show_usec(b.get("LastTriggerUSec", "")))


def _timers_over_dbus(pattern: str) -> dict[str, TimerState]:
    bus = _system_bus()
    if bus is None:
        return {}
    from .pystemd_modules import load

    systemd1 = load("systemd1")
    try:
        manager = systemd1.Manager(bus=bus)
        manager.load()
        out: dict[str, TimerState] = {}
        for row in manager.Manager.ListUnitsByPatterns([], [pattern.encode()]):
            name = _text(row[0])
            unit = systemd1.Unit(name.encode(), bus=bus)
            unit.load()
            out[name] = TimerState(name=name, next_elapse_usec=int(unit.Timer.NextElapseUSecRealtime),
                                   last_trigger_usec=int(unit.Timer.LastTriggerUSec))
        return out
    except Exception as exc:
        log.debug("cannot list timers over D-Bus: %s", exc)
        return {}
    finally:
        bus.close()


@dataclass(frozen=True)
class UnitFileState:
    """What `systemctl is-active` and `is-enabled` would say about one unit."""

    name: str
    load_state: str
    active_state: str
    unit_file_state: str


def unit_file_state(name: str) -> UnitFileState:
    """A unit's load, active and enablement state; raises SystemdUnavailable when PID 1 cannot be asked."""
    try:
        from .pystemd_modules import load

        unit = load("systemd1").Unit(name.encode())
        unit.load()
        return UnitFileState(name=name, load_state=_text(unit.Unit.LoadState),
                             active_state=_text(unit.Unit.ActiveState),
                             unit_file_state=_text(unit.Unit.UnitFileState))
    except Exception as exc:
        raise SystemdUnavailable(f"cannot read {name} over D-Bus: {exc}") from exc


def _manager_call(what: str, call: Callable[[Any], Any]) -> Any:
    try:
        from .pystemd_modules import load

        manager = load("systemd1").Manager()
        manager.load()
        return call(manager.Manager)
    except Exception as exc:
        raise SystemdUnavailable(f"cannot {what} over D-Bus: {exc}") from exc


def daemon_reload() -> None:
    """`systemctl daemon-reload`: PID 1 answers once the generators have run and the units are reloaded."""
    _manager_call("reload systemd", lambda m: m.Reload())


def unit_names(pattern: str) -> list[str]:
    """Units in PID 1's memory (loaded, active or with a job) whose name matches the glob pattern."""
    rows = _manager_call(f"list {pattern}", lambda m: m.ListUnitsByPatterns([], [pattern.encode()]))
    return sorted(_text(row[0]) for row in rows)


def start_unit(name: str) -> None:
    _manager_call(f"start {name}", lambda m: m.StartUnit(name.encode(), b"replace"))


def stop_unit(name: str) -> None:
    _manager_call(f"stop {name}", lambda m: m.StopUnit(name.encode(), b"replace"))


def disable_unit(name: str) -> None:
    """`systemctl disable`: remove the admin's enablement links of the unit."""
    _manager_call(f"disable {name}", lambda m: m.DisableUnitFiles([name.encode()], False))
