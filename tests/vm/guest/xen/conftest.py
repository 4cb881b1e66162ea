"""Fixtures for tests in the xen flavour (the guest is a Xen 4.17 dom0).

    xen_dom0        session: xen.service running, xen-blkback loaded; fails
                    clearly when the guest is not a dom0.
    domu_initramfs  session: the busybox initramfs of the test PV guest.
    vm1             vmlib.xen.SeedVm: the seed layout (see ../conftest.py,
                    parametrizable the same way) as `.layout`, with PV guest
                    vm1 running from /srv/xenvm/vm1/vm1.cfg (its disk:
                    /srv/xenvm/vm1/disk.img) as `.domain`; shut down, and
                    gone from `xl list`, afterwards.

Helpers for anything else: vmlib.xen (DomU, create, running, shutdown,
wait_until_gone, domain_exists, console_log).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vmlib import xen
from vmlib.storage import SeedLayout


@pytest.fixture(scope="session")
def xen_dom0() -> None:
    xen.start_xen()


@pytest.fixture(scope="session")
def domu_initramfs(xen_dom0: None) -> Path:
    return xen.build_domu_initramfs(Path("/run/xbtest/initrd.img"))


@pytest.fixture
def vm1(xen_dom0: None, seed_layout: SeedLayout) -> Iterator[xen.SeedVm]:
    """PV guest vm1 running from the seed layout: `.layout` (SeedLayout), `.domain` (RunningDomain)."""
    with xen.running(seed_layout.config, seed_layout.vm) as domain:
        yield xen.SeedVm(seed_layout, domain)
