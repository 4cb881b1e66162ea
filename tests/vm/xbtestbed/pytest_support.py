"""Glue between host pytest and the guest: one boot per suite, one host test per guest test."""

from __future__ import annotations

import queue
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from .config import Install, Settings
from .guestrun import GuestRequest, GuestRun, run_in_guest
from .image import ensure_image
from .junit import CaseResult, Outcome, parse_junit, results_for
from .package import debian_package
from .suites import SUITES, GuestCase, Suite, pytest_arguments

MARKER = "testvm"
"""`@pytest.mark.testvm("xen")`: the host tests of one suite (see suites.SUITES)."""

LOG_TAIL_LINES = 30
HUNG_TASK_LINES = 80


@dataclass
class SessionState:
    """What the host session knows about the guest runs (kept in config.stash)."""

    selected: dict[str, list[GuestCase]] = field(default_factory=dict)
    """Guest cases kept after deselection, by suite name."""
    runs: dict[str, GuestRun] = field(default_factory=dict)
    suites: list[str] = field(default_factory=list)
    """Suites with a selected host test, in the order they should boot."""
    pending: dict[str, Future[GuestRun]] = field(default_factory=dict)
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    """Progress lines of suites booting in worker threads; the main thread prints them."""
    pool: ThreadPoolExecutor | None = None
    preparing: Future[None] | None = None
    """The image and package being made ready while the host's own tests run (see prepare_early)."""


STATE_KEY = pytest.StashKey[SessionState]()


def state(config: pytest.Config) -> SessionState:
    if STATE_KEY not in config.stash:
        config.stash[STATE_KEY] = SessionState()
    return config.stash[STATE_KEY]


def suite_of(node: pytest.Item | pytest.Collector) -> Suite | None:
    marker = node.get_closest_marker(MARKER)
    return SUITES[marker.args[0]] if marker else None


def terminal_writer(config: pytest.Config) -> Callable[[str], None]:
    """Write a line to the terminal now, even while pytest captures output."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")

    def write(line: str) -> None:
        if reporter is None:
            return
        suspended: AbstractContextManager[None] = (
            capture.global_and_fixture_disabled() if capture is not None else nullcontext()
        )
        with suspended:
            reporter.write_line(line)

    return write


@dataclass
class FlavourResults:
    """One suite's guest run, judged per guest test."""

    run: GuestRun
    cases: list[CaseResult] | None
    """junit.xml's test cases, None when the guest wrote none."""

    @classmethod
    def from_run(cls, run: GuestRun) -> FlavourResults:
        junit = run.path("junit.xml")
        return cls(run, parse_junit(junit) if junit.is_file() else None)

    def check(self, case: GuestCase) -> None:
        """Pass, fail or skip as the guest test did; never pass what did not pass."""
        name = f"{self.run.request.name} guest: {case.node_id}"
        if self.run.error is not None:
            pytest.fail(f"{name}: test bed error: {self.run.error}\n{self._console_tail()}\n{self._pytest_tail()}"
                        f"{self._kernel_hangs()}", pytrace=False)
        if self.cases is None:
            pytest.fail(
                f"{name}: the guest wrote no junit.xml (exit code {self.run.exit_code})\n{self._pytest_tail()}",
                pytrace=False,
            )
        results = results_for(case, self.cases)
        if not results:
            pytest.fail(
                f"{name}: did not run in the guest (missing from junit.xml; exit code {self.run.exit_code})\n"
                f"{self._pytest_tail()}",
                pytrace=False,
            )
        failed = [result for result in results if result.outcome is Outcome.FAILED]
        if failed:
            reports = "\n\n".join(_describe(result) for result in failed)
            pytest.fail(f"{name}: failed in the guest\n\n{reports}\n\n{self._pytest_tail()}", pytrace=False)
        skipped = [result for result in results if result.outcome is Outcome.SKIPPED]
        if skipped:
            reasons = "; ".join(f"{result.name}: {result.message}" for result in skipped)
            pytest.skip(f"{name}: skipped in the guest: {reasons}")

    def check_install(self) -> None:
        """The product installed cleanly in the guest, the way the suite asked for."""
        how = self.run.request.install.describe()
        if self.run.error is not None:
            pytest.fail(f"test bed error: {self.run.error}", pytrace=False)
        rc_file = self.run.path("install.rc")
        if not rc_file.is_file():
            pytest.fail(f"the guest did not install the product ({how}):\n{self.run.tail('console.log', 15)}",
                        pytrace=False)
        rc = int(rc_file.read_text().strip())
        if rc != 0:
            pytest.fail(
                f"{how} failed in the guest with exit code {rc}:\n{self.run.tail('install.log')}",
                pytrace=False,
            )

    def _pytest_tail(self) -> str:
        log = self.run.path("pytest.log")
        return f"--- last {LOG_TAIL_LINES} lines of {log} ---\n{self.run.tail('pytest.log', LOG_TAIL_LINES)}"

    def _kernel_hangs(self) -> str:
        """The kernel's first hung-task report with its stacks (guest-run.sh streams dmesg.txt), if any."""
        try:
            return hung_task_report(self.run.path("dmesg.txt").read_text(errors="replace"))
        except OSError:
            return ""

    def _console_tail(self) -> str:
        log = self.run.path("console.log")
        return f"--- last 15 lines of {log} ---\n{self.run.tail('console.log', 15)}"


def hung_task_report(dmesg: str, lines: int = HUNG_TASK_LINES) -> str:
    """From a kernel log, the lines from the first "blocked for more than" report on, or "" without one."""
    text = dmesg.splitlines()
    for i, line in enumerate(text):
        if "blocked for more than" in line:
            return "\n--- the kernel's first hung-task report (dmesg.txt) ---\n" + "\n".join(text[i:i + lines])
    return ""


def _describe(result: CaseResult) -> str:
    return f"{result.label}: {result.message}\n{result.details.rstrip()}"


# Longest first, so that two lanes end close together (whole boots in a two-lane CI run of 2026-12-07, in
# minutes on one vCPU each: host 30, fleet 24, xen 24, faults 22, kvm 9, powercut 5.5, package 4.5). faults
# goes second all the same: it ends first, and the lane it frees takes fleet while host runs on.
BOOT_ORDER = ("host", "faults", "fleet", "xen", "kvm", "powercut", "package")


def boot_order(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: BOOT_ORDER.index(n) if n in BOOT_ORDER else len(BOOT_ORDER))


def _boot(config: pytest.Config, suite: Suite, settings: Settings, write: Callable[[str], None]) -> GuestRun:
    session = state(config)
    request = GuestRequest.pytest(
        suite.flavour, pytest_arguments(suite, session.selected.get(suite.name)), suite.name, suite.install,
        suite.cpu, suite.memory_mib,
    )
    echo = write if settings.echo_console else None
    return run_in_guest(request, settings, report=write, echo=echo)


def _start_all(config: pytest.Config, settings: Settings) -> None:
    """Boot every selected suite, `settings.parallel` at a time, in worker threads (once per session)."""
    session = state(config)
    if session.pool is not None:
        return
    session.pool = ThreadPoolExecutor(max_workers=settings.parallel, thread_name_prefix="suite")
    for name in session.suites:
        suite = SUITES[name]

        def write(line: str, name: str = name) -> None:
            session.lines.put(line if line.startswith("[") else f"[{name}] {line}")

        session.pending[name] = session.pool.submit(_boot, config, suite, settings, write)


def boot_suite(config: pytest.Config, suite: Suite) -> FlavourResults:
    """Boot the suite's guest (again if a test cuts its power) and run the selected in-guest tests.

    With XENBACKUP_TESTVM_PARALLEL above 1 every selected suite starts booting at the first call, and each
    call waits for its own suite, printing the progress of all of them meanwhile."""
    session = state(config)
    settings = Settings.from_environment()
    if 0 < len(session.suites) < settings.parallel:
        # Fewer suites than lanes: each guest gets the cores the missing ones would have had.
        settings = replace(settings, parallel=len(session.suites))
    write = terminal_writer(config)
    write("")
    if settings.parallel > 1 and suite.name in session.suites:
        _start_all(config, settings)
        future = session.pending[suite.name]
        while True:
            try:
                write(session.lines.get(timeout=1))
                continue
            except queue.Empty:
                pass
            if future.done():
                break
        run = future.result()
    else:
        run = _boot(config, suite, settings, write)
    session.runs[suite.name] = run
    return FlavourResults.from_run(run)


def prepare_early(config: pytest.Config, first_item_boots: bool) -> None:
    """Build the image (on a cold cache, minutes of mmdebstrap) and the package in the background while the
    tests before the first suite (the unit tests, a few minutes of one core) run, instead of after them.

    Only the image and the package: a guest booted beside the unit tests would share their cores during its
    timing-sensitive tests. A failure here is left to the boot, which repeats both steps and reports it."""
    session = state(config)
    if not session.suites or first_item_boots or session.preparing is not None:
        return
    settings = Settings.from_environment()
    installs_deb = any(SUITES[name].install is Install.DEB for name in session.suites)

    def prepare() -> None:
        settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
        ensure_image(settings, settings.artifacts_dir / "image-build.log", session.lines.put)
        if installs_deb:
            debian_package(settings.artifacts_dir / "deb", session.lines.put)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
    session.preparing = pool.submit(prepare)
    pool.shutdown(wait=False)


def shutdown(config: pytest.Config) -> None:
    """Wait for boots still running (a session cut short) so no qemu outlives pytest unaccounted."""
    session = state(config)
    if session.preparing is not None:
        session.preparing.exception()  # waits; its failure, if any, was the boots' to report
    if session.pool is not None:
        session.pool.shutdown(wait=True, cancel_futures=True)


def summary_lines(config: pytest.Config) -> list[str]:
    """Per-suite timings and artifact locations for the terminal summary."""
    lines = []
    for name, run in state(config).runs.items():
        stages = ", ".join(f"{stage} {seconds:.0f}s" for stage, seconds in run.timings.items())
        verdict = f"test bed error: {run.error}" if run.error else f"guest exit code {run.exit_code}"
        lines.append(f"{name}: {stages or 'no timings'}; {verdict}; artifacts: {_relative(run.artifacts)}")
    return lines


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
