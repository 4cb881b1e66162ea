"""Host side of the VM test bed.

The files under guest/ run inside a qemu guest, not here: each suite's
host test class (test_guest_suites.py) boots the guest once, runs its in-guest tests there, and
reports each one as a host test (see xbtestbed/pytest_support.py).
XENBACKUP_TESTVM_FLAVOURS=host (or xen) limits the run to the suites of one flavour.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The harness package sits beside this file; make it importable whatever
# import mode pytest runs in.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from xbtestbed.config import InfraError, Settings
from xbtestbed.pytest_support import (
    MARKER,
    FlavourResults,
    boot_order,
    boot_suite,
    prepare_early,
    shutdown,
    state,
    suite_of,
    summary_lines,
)
from xbtestbed.suites import GuestCase, guest_cases

collect_ignore = ["guest", "demo", "image", "artifacts"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}(suite): host tests that boot the test bed guest for a suite")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop suites whose flavour XENBACKUP_TESTVM_FLAVOURS leaves out, and suites outside the default run
    that XENBACKUP_TESTVM_EXTRA does not name; note which guest tests remain."""
    try:
        settings = Settings.from_environment()
    except InfraError as exc:
        raise pytest.UsageError(str(exc)) from exc
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        suite = suite_of(item)
        wanted = suite is None or (suite.flavour in settings.flavours
                                   and (suite.in_default_run or suite.name in settings.extra_suites))
        (kept if wanted else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    selected = state(config).selected
    booting: list[str] = []
    for item in kept:
        suite = suite_of(item)
        if suite is not None and suite.name not in booting:
            booting.append(suite.name)
        callspec = getattr(item, "callspec", None)
        if suite is not None and callspec is not None and isinstance(callspec.params.get("case"), GuestCase):
            selected.setdefault(suite.name, []).append(callspec.params["case"])
    state(config).suites = boot_order(booting)
    prepare_early(config, first_item_boots=bool(kept) and suite_of(kept[0]) is not None)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutdown(config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One `case` per test function in the suite's guest test files."""
    suite = suite_of(metafunc.definition)
    if "case" in metafunc.fixturenames and suite is not None:
        metafunc.parametrize("case", guest_cases(suite), ids=str)


@pytest.fixture(scope="class")
def guest_results(request: pytest.FixtureRequest) -> FlavourResults:
    """Boot this class's suite once and run its in-guest tests."""
    suite = suite_of(request.node)
    assert suite is not None, f"{request.node.nodeid} lacks @pytest.mark.{MARKER}(suite)"
    return boot_suite(request.config, suite)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = summary_lines(terminalreporter.config)
    if lines:
        terminalreporter.section("VM test bed")
        for line in lines:
            terminalreporter.write_line(line)
