"""Back up a two-disk PV guest by discovery, at one instant: the pause window, its faults and a full restore.

One guest, db1, serves the whole module (one Xen boot of it): its init writes
a counter to xvda and then to xvdb (vmlib.counterguest), so two restored disks
whose counters are not (n, n) or (n, n - 1) come from two different instants.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vmlib import counterguest
from vmlib.counterguest import CounterGuest, holds_together, is_paused
from vmlib.storage import BLANK_DISKS


@pytest.fixture(scope="module")
def db1(xen_dom0: None, domu_initramfs: Path) -> Iterator[CounterGuest]:
    from vmlib.xen import domu_kernel
    with counterguest.counter_guest(BLANK_DISKS[1], domu_kernel(), domu_initramfs) as guest:
        yield guest


def test_the_counter_guest_writes_both_disks_in_order(db1: CounterGuest) -> None:
    """The instrument itself: paused, the guest's disks hold the relation; running, the counter moves."""
    seen = []
    for _ in range(3):
        db1.wait_advancing()
        from vmlib.cmd import run
        run("xl", "pause", db1.name)
        try:
            assert is_paused(db1.name)
            seen.append(db1.counters())
        finally:
            run("xl", "unpause", db1.name)
    assert all(holds_together(a, b) for a, b in seen), seen
    assert seen[0][0] < seen[1][0] < seen[2][0], seen
    print("paused counters", seen)
