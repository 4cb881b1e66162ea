"""Which in-guest tests belong to which suite (one guest boot each), found statically with `ast`.

The host parametrizes one test per in-guest test at collection time, without
importing the guest files (they need root, LVM and Xen, and may import
modules that exist only in the guest).
"""

from __future__ import annotations

import ast
import threading
from dataclasses import dataclass
from pathlib import Path

from .config import GUEST_TEST_DIR, REPO_ROOT, Flavour, Install


@dataclass(frozen=True)
class Suite:
    """The part of tests/vm/guest/ that one guest boot (or chain of boots) runs."""

    name: str
    """Also the artifacts subdirectory and the argument of @pytest.mark.testvm."""
    flavour: Flavour
    directory: str
    """Relative to tests/vm/guest/; "" is the directory itself."""
    excluded: tuple[str, ...] = ()
    """Subdirectories (relative to tests/vm/guest/) that belong to other suites."""
    install: Install = Install.DEB
    """How the guest installs the product; one suite keeps packaging/install.sh proven."""
    cpu: str | None = None
    """qemu's -cpu for a host-flavour boot; None is the flavour's model (qemu.HOST_CPU)."""
    in_default_run: bool = True
    """False: only a run that names the suite in XENBACKUP_TESTVM_EXTRA boots it (`make test-fleet`)."""
    memory_mib: int | None = None
    """The guest's RAM for a host-flavour boot; None is the flavour's default."""


SUITES: dict[str, Suite] = {
    suite.name: suite
    for suite in (
        Suite("host", Flavour.HOST, "", excluded=("xen", "powercut", "kvm", "package", "fleet", "faults")),
        # The fault matrix is a third of the host flavour's time: its own boot lets it run beside the rest.
        Suite("faults", Flavour.HOST, "faults"),
        Suite("xen", Flavour.XEN, "xen"),
        # libvirtd and its TCG-in-TCG domain would slow every other host test down, and the domain's
        # boot is paid once for the whole suite.
        Suite("kvm", Flavour.HOST, "kvm"),
        # Power-cut tests reset the guest mid-test and continue in a second boot
        # (see guestrun.REBOOT_REQUEST), so they cannot share a boot with others.
        # This suite installs with packaging/install.sh, so that path stays proven.
        Suite("powercut", Flavour.HOST, "powercut", install=Install.SCRIPT),
        # The package's own claims: one boot to install it and set a schedule, a second to see what systemd
        # made of it at boot, then dpkg --purge.
        Suite("package", Flavour.HOST, "package"),
        # A single-node Ceph (mon, mgr, OSD, radosgw) and an sshd as the fleet's shared repositories, on the
        # host flavour's CPU model (ceph-mon dies of SIGILL on qemu's default one). Ceph's daemons need about
        # 750 MB beside the product and its tests.
        Suite("fleet", Flavour.HOST, "fleet", memory_mib=3072),
    )
}


@dataclass(frozen=True, order=True)
class GuestCase:
    """One test function in a guest test file."""

    path: str
    """The file, relative to tests/vm/guest/, e.g. "xen/test_smoke_xen.py"."""
    function: str
    cls: str | None = None

    @property
    def node_id(self) -> str:
        """The pytest node id relative to tests/vm/guest/ (also the host's test id)."""
        parts = [self.path, *([self.cls] if self.cls else []), self.function]
        return "::".join(parts)

    @property
    def guest_argument(self) -> str:
        """The node id as the in-guest runner passes it to pytest."""
        return f"{guest_dir_argument()}/{self.node_id}"

    @property
    def junit_module(self) -> str:
        """The file as a dotted module path, as junit.xml names it."""
        return self.path.removesuffix(".py").replace("/", ".")

    @property
    def junit_classname(self) -> str:
        """The `classname` pytest writes to junit.xml when rooted at tests/vm/guest/."""
        return f"{self.junit_module}.{self.cls}" if self.cls else self.junit_module

    def __str__(self) -> str:
        return self.node_id


def guest_dir_argument() -> str:
    """tests/vm/guest as a path relative to the project tree."""
    return GUEST_TEST_DIR.relative_to(REPO_ROOT).as_posix()


def guest_cases(suite: Suite, root: Path = GUEST_TEST_DIR) -> list[GuestCase]:
    """Every test_* function the suite holds, in file order."""
    base = root / suite.directory
    cases: list[GuestCase] = []
    for path in sorted(base.rglob("test_*.py")):
        relative = path.relative_to(root).as_posix()
        if any(relative.startswith(f"{excluded}/") for excluded in suite.excluded):
            continue
        cases += scan_file(path, relative)
    return cases


# The suites boot on threads of their own, and each scans its files there. CPython 3.11's AST conversion
# keeps its recursion depth in state shared by threads, so two ast.parse calls at once can fail with
# "SystemError: AST constructor recursion depth mismatch" (CPython gh-106905; it cost a CI run the faults
# suite). One parse at a time.
_PARSE = threading.Lock()


def scan_file(path: Path, relative: str) -> list[GuestCase]:
    """The test functions and Test* class methods defined in one file."""
    source = path.read_text()
    with _PARSE:
        tree = ast.parse(source, filename=str(path))
    cases = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
            cases.append(GuestCase(relative, node.name))
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            cases += [
                GuestCase(relative, item.name, node.name)
                for item in node.body
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name.startswith("test")
            ]
    return cases


def pytest_arguments(suite: Suite, selected: list[GuestCase] | None) -> list[str]:
    """The in-guest pytest arguments: the whole suite, or just the selected cases.

    Running the whole directory also picks up what the static scan cannot
    see; a subset (from `-k` or a node id on the host) keeps a rerun short.
    """
    everything = guest_cases(suite)
    if selected is not None and set(selected) != set(everything):
        return [case.guest_argument for case in selected]
    base = guest_dir_argument()
    directory = f"{base}/{suite.directory}".rstrip("/")
    return [directory, *(f"--ignore={base}/{excluded}" for excluded in suite.excluded)]
