"""The snapshot window: the guest does no I/O while all of a VM's snapshots are created.

An LVM snapshot of one LV is atomic, but snapshots of two LVs taken seconds apart are not: a database with
its data on one disk and its log on another would restore into a state that never existed. So the guest is
paused (xl pause, virsh suspend) or its filesystems frozen (the qemu guest agent) for exactly as long as the
lvcreate calls take, and never longer than max_pause.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..hypervisor import Hypervisor
from ..model import Consistency, HypervisorKind

log = logging.getLogger(__name__)


class PauseTooLong(Exception):
    """The window outlasted max_pause; the guest was resumed and the run must not use its snapshots."""


class ResumeFailed(Exception):
    """The guest could not be resumed: loud, and the run state keeps the pause for cleanup and the sweep."""


def choose(consistency: Consistency, kind: HypervisorKind, disk_count: int,
           agent_answers: Callable[[], bool]) -> Consistency:
    """What "auto" means for this VM now: freeze where a guest agent answers, else pause for several disks."""
    if consistency is not Consistency.AUTO:
        return consistency
    if kind is HypervisorKind.NONE:
        return Consistency.NONE
    if kind is HypervisorKind.KVM and agent_answers():
        return Consistency.FREEZE
    return Consistency.PAUSE if disk_count > 1 else Consistency.NONE


@dataclass
class Window:
    """An open window; `check()` after each snapshot raises once max_pause has passed."""

    method: Consistency
    max_pause: float
    started: float = 0.0
    ended: float = 0.0
    expired: bool = False

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started if self.started else 0.0

    def check(self) -> None:
        if self.expired:
            raise PauseTooLong(f"the guest was {_verb(self.method)} for more than max_pause ({self.max_pause:g} s) "
                               "while its snapshots were created; resumed it and dropped this run's snapshots. "
                               "Raise max_pause, or use fewer or faster disks")


def _verb(method: Consistency) -> str:
    return "frozen" if method is Consistency.FREEZE else "paused"


@contextmanager
def quiesced(hv: Hypervisor, vm: str, method: Consistency, max_pause: float,
             record: Callable[[str], None]) -> Iterator[Window]:
    """Pause or freeze `vm` around the block. `record(method)` is called before the guest is touched and
    `record("")` once it runs again, so a killed run leaves a record that cleanup can act on."""
    window = Window(method, max_pause)
    if method is Consistency.NONE:
        yield window
        return
    if not hv.is_running(vm):
        log.info("%s is not running; its disks are quiet without a pause", vm)
        window.method = Consistency.NONE
        yield window
        return
    if method is Consistency.PAUSE and hv.is_paused(vm):
        # Someone else paused it: it is quiet already, and it is theirs to unpause.
        log.info("%s is already paused (not by xenbackup); leaving it paused", vm)
        window.method = Consistency.NONE
        yield window
        return
    suspend, resume = (hv.freeze, hv.thaw) if method is Consistency.FREEZE else (hv.pause, hv.unpause)
    lock = threading.Lock()
    resumed = False

    def resume_once() -> None:
        nonlocal resumed
        with lock:
            if resumed:
                return
            resume(vm)
            resumed = True
            window.ended = time.monotonic()

    def expire() -> None:
        window.expired = True
        log.error("%s has been %s for max_pause (%g s); resuming it now", vm, _verb(method), max_pause)
        try:
            resume_once()
        except Exception as exc:
            log.error("could not resume %s: %s", vm, exc)

    record(method.value)
    suspend(vm)
    window.started = time.monotonic()
    timer = threading.Timer(max_pause, expire)
    timer.daemon = True
    timer.start()
    try:
        yield window
    finally:
        timer.cancel()
        try:
            resume_once()
        except Exception as exc:
            log.critical("%s is still %s and xenbackup could not resume it: %s. Resume it by hand "
                         "(xl unpause / virsh resume / virsh domfsthaw); cleanup and the boot sweep retry",
                         vm, _verb(method), exc)
            raise ResumeFailed(f"could not resume {vm}: {exc}") from exc
        record("")
        log.info("%s was %s for %.1f s while its snapshots were created%s", vm, _verb(method), window.seconds,
                 ": cut short at max_pause" if window.expired else "",
                 extra={"fields": {"consistency": method.value, "pause_seconds": f"{window.seconds:.2f}"}})


def resume_left(hv: Hypervisor, vm: str, method: str) -> None:
    """Resume a guest an interrupted run left paused or frozen (cleanup, the boot sweep)."""
    if not method:
        return
    if not hv.is_running(vm):
        return
    log.warning("resuming %s, left %s by an interrupted run", vm, "frozen" if method == "freeze" else "paused")
    if method == Consistency.FREEZE.value:
        hv.thaw(vm)
    elif hv.is_paused(vm):
        hv.unpause(vm)
