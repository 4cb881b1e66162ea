"""The snapshot window: what auto means, max_pause, and that a guest is never left paused."""

from __future__ import annotations

import time

import pytest

from xenbackup.actions.window import PauseTooLong, ResumeFailed, choose, quiesced, resume_left
from xenbackup.model import Consistency, DomainDisk, HypervisorKind


class RecordingHypervisor:
    """Stands in for xl/virsh: records every call, keeps a paused flag."""

    def __init__(self, running: bool = True, paused: bool = False, fail_resume: bool = False) -> None:
        self.running = running
        self.paused = paused
        self.frozen = False
        self.fail_resume = fail_resume
        self.calls: list[str] = []

    def is_running(self, name: str) -> bool:
        return self.running

    def shutdown(self, name: str, timeout: float) -> None:
        self.calls.append("shutdown")

    def start(self, name: str, domain_config: str | None) -> None:
        self.calls.append("start")

    def disks(self, name: str, domain_config: str | None) -> list[DomainDisk]:
        return []

    def is_paused(self, name: str) -> bool:
        return self.paused

    def pause(self, name: str) -> None:
        self.calls.append("pause")
        self.paused = True

    def unpause(self, name: str) -> None:
        self.calls.append("unpause")
        if self.fail_resume:
            raise RuntimeError("xl unpause failed")
        self.paused = False

    def agent_answers(self, name: str) -> bool:
        return True

    def freeze(self, name: str) -> None:
        self.calls.append("freeze")
        self.frozen = True

    def thaw(self, name: str) -> None:
        self.calls.append("thaw")
        self.frozen = False


@pytest.mark.parametrize(("kind", "disks", "agent", "want"), [
    (HypervisorKind.XEN, 1, False, Consistency.NONE),
    (HypervisorKind.XEN, 2, False, Consistency.PAUSE),
    (HypervisorKind.KVM, 1, True, Consistency.FREEZE),
    (HypervisorKind.KVM, 2, False, Consistency.PAUSE),
    (HypervisorKind.KVM, 1, False, Consistency.NONE),
    (HypervisorKind.NONE, 3, False, Consistency.NONE),
])
def test_auto_means_freeze_with_an_agent_else_pause_for_several_disks(
        kind: HypervisorKind, disks: int, agent: bool, want: Consistency) -> None:
    assert choose(Consistency.AUTO, kind, disks, lambda: agent) is want
    assert choose(Consistency.PAUSE, kind, disks, lambda: agent) is Consistency.PAUSE


def test_pause_wraps_the_block_and_records_it_before_touching_the_guest() -> None:
    hv = RecordingHypervisor()
    records: list[tuple[str, bool]] = []
    with quiesced(hv, "db1", Consistency.PAUSE, 10, lambda m: records.append((m, hv.paused))) as window:
        assert hv.paused
        time.sleep(0.05)
    assert hv.calls == ["pause", "unpause"] and not hv.paused
    # "pause" is on record while the guest is still running; "" only after it runs again.
    assert records == [("pause", False), ("", False)]
    assert 0.05 <= window.seconds < 5


def test_freeze_uses_the_guest_agent() -> None:
    hv = RecordingHypervisor()
    with quiesced(hv, "kvm1", Consistency.FREEZE, 10, lambda m: None):
        assert hv.frozen
    assert hv.calls == ["freeze", "thaw"]


def test_past_max_pause_the_guest_is_resumed_at_once_and_the_run_fails(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    hv = RecordingHypervisor()
    with pytest.raises(PauseTooLong, match="max_pause"), \
            quiesced(hv, "db1", Consistency.PAUSE, 1, lambda m: None) as window:
        deadline = time.monotonic() + 5
        while hv.paused and time.monotonic() < deadline:
            time.sleep(0.05)
        # Resumed by the timer while the (slow) snapshot was still being made.
        assert not hv.paused
        window.check()
    assert hv.calls == ["pause", "unpause"]
    assert "cut short at max_pause" in caplog.text


def test_an_exception_inside_the_window_still_resumes() -> None:
    hv = RecordingHypervisor()
    with pytest.raises(RuntimeError, match="lvcreate"), quiesced(hv, "db1", Consistency.PAUSE, 10, lambda m: None):
        raise RuntimeError("lvcreate failed on the second disk")
    assert not hv.paused


def test_a_guest_paused_by_the_admin_stays_paused() -> None:
    hv = RecordingHypervisor(paused=True)
    with quiesced(hv, "db1", Consistency.PAUSE, 10, lambda m: None) as window:
        pass
    assert hv.calls == [] and hv.paused and window.method is Consistency.NONE


def test_a_stopped_guest_needs_no_pause() -> None:
    hv = RecordingHypervisor(running=False)
    with quiesced(hv, "db1", Consistency.PAUSE, 10, lambda m: None):
        pass
    assert hv.calls == []


def test_a_resume_that_fails_is_loud_and_stays_on_record() -> None:
    hv = RecordingHypervisor(fail_resume=True)
    records: list[str] = []
    with pytest.raises(ResumeFailed), quiesced(hv, "db1", Consistency.PAUSE, 10, records.append):
        pass
    assert records == ["pause"]  # never cleared: cleanup and the sweep retry


def test_cleanup_resumes_what_an_interrupted_run_left() -> None:
    hv = RecordingHypervisor(paused=True)
    resume_left(hv, "db1", "pause")
    assert hv.calls == ["unpause"]
    hv = RecordingHypervisor()
    hv.frozen = True
    resume_left(hv, "kvm1", "freeze")
    assert hv.calls == ["thaw"]
    hv = RecordingHypervisor(paused=False)
    resume_left(hv, "db1", "pause")
    resume_left(hv, "db1", "")
    assert hv.calls == []
