"""`xenbackup reload`: make the running timers match the config, without a reboot.

`systemctl daemon-reload` reruns the generator, but PID 1 does not start a unit that a generator newly
wants, nor stop one it no longer wants; until the next boot a new `schedule` never fires and a removed one
keeps firing on the template's default. Hosts run for months, so this verb does what a boot would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from .. import names, systemd
from ..config import Config
from ..systemd import UnitFileState

log = logging.getLogger(__name__)

# Enabled by the package; a `systemctl enable` without --now leaves them inactive until the next boot.
SERVICE_TIMERS = names.SERVICE_TIMERS
ENABLED = ("enabled", "enabled-runtime")
RUNNING = ("active", "activating", "reloading")


class TimerChange(StrEnum):
    START = "start"
    STOP = "stop"
    STOP_AND_DISABLE = "stop and disable"


@dataclass(frozen=True)
class TimerAction:
    unit: str
    change: TimerChange
    why: str


def plan_timers(cfg: Config, states: Mapping[str, UnitFileState]) -> list[TimerAction]:
    """What to start and stop so that the timers match cfg; states holds every xenbackup timer PID 1 knows."""
    actions: list[TimerAction] = []
    wanted = {names.timer(vm.name): vm.name for vm in cfg.vms.values() if vm.schedule is not None}
    for unit, name in sorted(wanted.items()):
        st = states.get(unit)
        if st is None or st.active_state not in RUNNING:
            actions.append(TimerAction(unit, TimerChange.START, f"vm.{name}.schedule"))
    for unit, st in sorted(states.items()):
        vm = names.vm_of_unit(unit)
        if unit in wanted or unit in SERVICE_TIMERS or vm is None:
            continue
        running = st.active_state in RUNNING
        if vm not in cfg.vms:
            if running or st.unit_file_state in ENABLED:
                actions.append(TimerAction(unit, TimerChange.STOP_AND_DISABLE, f"no vm.{vm} in {cfg.path}"))
        elif running and st.unit_file_state not in ENABLED:
            # An admin's own `systemctl enable` (the template's default schedule) is theirs to keep.
            actions.append(TimerAction(unit, TimerChange.STOP, f"vm.{vm} has no schedule"))
    for unit in SERVICE_TIMERS:
        st = states.get(unit)
        if st is not None and st.unit_file_state in ENABLED and st.active_state not in RUNNING:
            actions.append(TimerAction(unit, TimerChange.START, "enabled but not running"))
    return actions


def reload(cfg: Config, say: Callable[[str], None]) -> list[TimerAction]:
    """Reload systemd (which reruns the generator), then start and stop timers to match cfg."""
    systemd.daemon_reload()
    units = set(systemd.unit_names(names.TIMER_PATTERN))
    units |= {names.timer(vm.name) for vm in cfg.vms.values() if vm.schedule is not None}
    units |= set(SERVICE_TIMERS)
    states = {unit: systemd.unit_file_state(unit) for unit in sorted(units)}
    actions = plan_timers(cfg, states)
    for action in actions:
        if action.change is TimerChange.START:
            systemd.start_unit(action.unit)
        else:
            systemd.stop_unit(action.unit)
            if action.change is TimerChange.STOP_AND_DISABLE:
                systemd.disable_unit(action.unit)
        log.info("%s %s (%s)", action.change.value, action.unit, action.why)
    if any(a.change is TimerChange.STOP_AND_DISABLE for a in actions):
        systemd.daemon_reload()  # disabling changed the unit files
    scheduled = sorted(vm.name for vm in cfg.vms.values() if vm.schedule is not None)
    say(f"systemd reloaded; scheduled VMs: {', '.join(scheduled) or 'none'}; "
        f"{len(actions)} timer(s) changed")
    return actions
