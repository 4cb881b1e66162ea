"""Fixtures for tests that run as root inside the test bed guest.

    seed_layout   VG `system` on /dev/disk/by-id/virtio-xbtest1, LV `xenvm`
                  (1 GiB, ext4 by default) at /srv/xenvm, vm1's files in
                  /srv/xenvm/vm1; the rest of the VG stays free for snapshots.
                  Choose the filesystem with
                  @pytest.mark.parametrize("seed_layout", ["xfs"], indirect=True).
    thin_layout   VG `thinvg` on virtio-xbtest2: thin pool `pool0`, thin LV
                  `thinvol` (ext4, or parametrize like seed_layout) at /srv/thin.
    blank_disk    /dev/disk/by-id/virtio-xbtest3, wiped again afterwards.

Every fixture removes what it made (umount, lvremove, vgremove, pvremove,
wipefs), also after a failure, so tests stay independent. seed_layout
alone keeps its VG, LV and filesystem for the next test that asks for the
same filesystem and writes vm1's files anew there; a layout that is not as
it was made (another LV, a snapshot, a tag, a mount, a resize) is built
again from a blank disk. Helpers live in
the vmlib package (vmlib.storage, vmlib.xen, vmlib.cmd).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vmlib.product import Journal, Xb, fresh_product
from vmlib.storage import (
    BLANK_DISKS,
    SeedLayout,
    ThinLayout,
    clear_disk,
    release_kept_layouts,
    wait_for_disks,
)
from vmlib.storage import (
    seed_layout as seed_layout_context,
)
from vmlib.storage import (
    thin_layout as thin_layout_context,
)


def _fstype(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "ext4"))


@pytest.fixture(scope="session", autouse=True)
def _kept_layouts_released() -> Iterator[None]:
    """seed_layout keeps its VG for the next test; the session's end takes it down."""
    yield
    release_kept_layouts()


@pytest.fixture
def seed_layout(request: pytest.FixtureRequest) -> Iterator[SeedLayout]:
    """The seed manual's layout (ext4 unless parametrized indirectly with "xfs")."""
    with seed_layout_context(_fstype(request), BLANK_DISKS[0]) as layout:
        yield layout


@pytest.fixture
def thin_layout(request: pytest.FixtureRequest) -> Iterator[ThinLayout]:
    """A thin pool and a mounted thin LV with a few files (ext4 unless parametrized)."""
    with thin_layout_context(_fstype(request), BLANK_DISKS[1]) as layout:
        yield layout


@pytest.fixture
def blank_disk() -> Iterator[Path]:
    """The third blank disk, for tests that build their own volume group (removed afterwards)."""
    disk = BLANK_DISKS[2]
    wait_for_disks((disk,))
    clear_disk(disk)
    yield disk
    clear_disk(disk)


@pytest.fixture
def xb() -> Iterator[Xb]:
    """A clean xenbackup state (no config, repository or run records), reset again afterwards."""
    yield from fresh_product()


@pytest.fixture
def journal() -> Journal:
    """Reads only what the journal got after the test began."""
    return Journal()
