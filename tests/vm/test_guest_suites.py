"""Each suite boots the guest once and reports every in-guest test here.

    TestHostFlavour  Debian's kernel: systemd, journald, LVM;
                     runs tests/vm/guest/ except xen/, powercut/, kvm/, package/ and fleet/.
    TestXenFlavour   Xen 4.17 with Debian's kernel as dom0, PV guests;
                     runs tests/vm/guest/xen/.
    TestPowerCut     Debian's kernel; tests/vm/guest/powercut/ resets the
                     guest mid-backup and finishes in a second boot. The
                     only suite that installs with packaging/install.sh.
    TestKvm          Debian's kernel with a real libvirtd; tests/vm/guest/kvm/
                     runs a qemu domain (TCG inside TCG) from two LVs.
    TestPackage      Debian's kernel; tests/vm/guest/package/ checks what
                     systemd, journald and dpkg make of the installed .deb,
                     across a reboot, and purges it last.
    TestFleet        Debian's kernel with a single-node Ceph (RGW) and an
                     sshd; tests/vm/guest/fleet/ backs up several "hosts"
                     to one shared S3 or SFTP repository at once.

The other suites install the .deb that the host run built, with apt-get.

`test_in_guest` is parametrized with the guest's test functions, found
statically (see conftest.py's pytest_generate_tests).
"""

from __future__ import annotations

import pytest
from xbtestbed.pytest_support import FlavourResults
from xbtestbed.suites import GuestCase


class GuestSuite:
    def test_product_installs_offline_in_guest(self, guest_results: FlavourResults) -> None:
        guest_results.check_install()

    def test_in_guest(self, case: GuestCase, guest_results: FlavourResults) -> None:
        guest_results.check(case)


@pytest.mark.testvm("host")
class TestHostFlavour(GuestSuite):
    pass


@pytest.mark.testvm("faults")
class TestFaults(GuestSuite):
    pass


@pytest.mark.testvm("xen")
class TestXenFlavour(GuestSuite):
    pass


@pytest.mark.testvm("powercut")
class TestPowerCut(GuestSuite):
    pass


@pytest.mark.testvm("kvm")
class TestKvm(GuestSuite):
    pass


@pytest.mark.testvm("package")
class TestPackage(GuestSuite):
    pass


@pytest.mark.testvm("fleet")
class TestFleet(GuestSuite):
    pass
