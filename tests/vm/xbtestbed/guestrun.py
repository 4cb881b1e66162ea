"""One guest boot: image, overlay, disks, shares, qemu, results, artifacts.

Everything the guest should do is described by a GuestRequest, written to
the results share as request.env and read by tests/vm/guest-run.sh.

A test may cut the guest's power (sysrq `b`; qemu runs with -no-reboot, so
it exits) after writing REBOOT_REQUEST to the results share. The guest is
then booted again on the same root overlay and disks with the same request,
like a host coming back after a power cut; the test finds its own notes on
the guest's disk and finishes. Each earlier boot's logs go to `bootN/`.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from . import qemu
from .config import REPO_ROOT, Flavour, InfraError, Install, Settings
from .image import check_free_space, ensure_image
from .package import debian_package

WORK_SPACE_NEEDED = 4 * 2**30
"""Overlay growth plus what the tests write to the sparse blank disks."""
RUNNER_MARGIN = 60.0
"""Seconds the host allows beyond the guest's own limit before killing qemu."""
STEP_OVERHEAD = 240.0
"""Seconds of the guest's limit kept for copying, installing and exporting logs."""
REBOOT_REQUEST = "reboot-request"
"""In the results share: the guest is about to cut its power and wants to be booted again."""
MAX_BOOTS = 3

Report = Callable[[str], None]


class GuestMode(StrEnum):
    PYTEST = "pytest"
    SCRIPT = "script"


@dataclass(frozen=True)
class GuestRequest:
    """What the guest runner does after boot."""

    flavour: Flavour
    mode: GuestMode
    arguments: tuple[str, ...]
    """pytest arguments, or the script (relative to the project tree) and its arguments."""
    name: str
    """The artifacts subdirectory."""
    install: Install = Install.DEB
    cpu: str | None = None
    """qemu's -cpu for the host flavour (see suites.Suite.cpu)."""
    memory_mib: int | None = None
    """The host flavour's RAM (see suites.Suite.memory_mib)."""

    @classmethod
    def pytest(
        cls, flavour: Flavour, arguments: list[str], name: str | None = None, install: Install = Install.DEB,
        cpu: str | None = None, memory_mib: int | None = None,
    ) -> GuestRequest:
        return cls(flavour, GuestMode.PYTEST, tuple(arguments), name or flavour.value, install, cpu, memory_mib)

    @classmethod
    def script(
        cls, flavour: Flavour, script: str, arguments: list[str] | None = None, install: Install = Install.DEB,
        cpu: str | None = None, memory_mib: int | None = None,
    ) -> GuestRequest:
        name = f"{flavour.value}-{Path(script).stem}"
        return cls(flavour, GuestMode.SCRIPT, (script, *(arguments or [])), name, install, cpu, memory_mib)

    def env_text(self, step_timeout: float, package: str = "") -> str:
        """request.env: sourced by guest-run.sh; `package` is the .deb's name in the results share."""
        quoted = " ".join(shlex.quote(argument) for argument in self.arguments)
        return (
            f"XBTEST_FLAVOUR={self.flavour.value}\n"
            f"XBTEST_MODE={self.mode.value}\n"
            f"XBTEST_ARGS=({quoted})\n"
            f"XBTEST_STEP_TIMEOUT={int(step_timeout)}\n"
            f"XBTEST_INSTALL={self.install.value}\n"
            f"XBTEST_DEB={shlex.quote(package)}\n"
        )


@dataclass
class GuestRun:
    """The outcome of one boot, with its artifacts copied out."""

    request: GuestRequest
    artifacts: Path
    error: str | None = None
    """A test bed failure (no boot, timeout, ...), as one line."""
    exit_code: int | None = None
    """The exit code of the guest's pytest or script."""
    timings: dict[str, float] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.artifacts / name

    def tail(self, name: str, lines: int = 40) -> str:
        """The last lines of an artifact, or a note that it is missing."""
        path = self.path(name)
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return f"({name} is missing)"
        return "\n".join(text.splitlines()[-lines:])


def run_in_guest(
    request: GuestRequest,
    settings: Settings,
    report: Report,
    echo: Report | None = None,
) -> GuestRun:
    """Boot a guest for `request` and collect its results; test bed problems end up in `error`."""
    artifacts = settings.artifacts_dir / request.name
    shutil.rmtree(artifacts, ignore_errors=True)
    artifacts.mkdir(parents=True)
    run = GuestRun(request, artifacts)

    def say(message: str) -> None:
        report(f"[{request.name}] {message}")

    try:
        _boot(request, settings, run, say, echo)
    except (InfraError, OSError, subprocess.SubprocessError) as exc:
        run.error = str(exc)
        say(f"test bed error: {exc}")
    return run


def _boot(request: GuestRequest, settings: Settings, run: GuestRun, say: Report, echo: Report | None) -> None:
    qemu.require_tools()
    started = time.monotonic()
    build_log = settings.artifacts_dir / "image-build.log"
    say(f"checking the image cache {settings.cache_dir}")
    image, built = ensure_image(settings, build_log, say)
    run.timings["image build" if built else "image (cached)"] = time.monotonic() - started
    say(f"image {image.key}: " + (f"built in {run.timings['image build']:.0f}s" if built else "cached"))

    package = None
    if request.install is Install.DEB:
        started = time.monotonic()
        package = debian_package(settings.artifacts_dir / "deb", say)
        run.timings["package build"] = time.monotonic() - started
    check_free_space(settings.work_dir, WORK_SPACE_NEEDED, "boot the test bed guest")
    with tempfile.TemporaryDirectory(prefix="xenbackup-testvm-", dir=settings.work_dir) as work:
        workdir = Path(work)
        results = workdir / "results"
        results.mkdir()
        total_limit = settings.guest_timeout(request.flavour)
        guest_limit = total_limit - settings.boot_timeout - RUNNER_MARGIN
        if guest_limit < STEP_OVERHEAD + 60:
            raise InfraError(
                f"XENBACKUP_TESTVM_TIMEOUT={total_limit:.0f}s leaves too little time after"
                f" the boot timeout of {settings.boot_timeout:.0f}s"
            )
        machine = qemu.Machine(
            flavour=request.flavour,
            image=image,
            overlay=qemu.create_overlay(image, workdir),
            blank_disks=qemu.create_blank_disks(workdir),
            source_share=REPO_ROOT,
            results_share=results,
            guest_timeout=guest_limit,
            cpu=request.cpu,
            memory_mib=request.memory_mib,
            vcpus=settings.vcpus(),
        )
        (run.artifacts / "qemu-command.txt").write_text(shlex.join(machine.command()) + "\n")
        for boot in range(1, MAX_BOOTS + 1):
            # Again on each boot: setting the last boot's logs aside empties the share.
            if package is not None:
                shutil.copy2(package, results / package.name)
            (results / "request.env").write_text(
                request.env_text(guest_limit - STEP_OVERHEAD, package.name if package else "")
            )
            again = f", boot {boot} after a power cut" if boot > 1 else ""
            say(f"booting ({request.flavour.value} flavour, TCG){again}")
            outcome = _boot_once(machine, settings, run, say, echo, total_limit, boot)
            if outcome.watch.errors:
                raise InfraError(f"guest reported: {outcome.watch.errors[0]}; console: {run.path('console.log')}")
            if not (run.artifacts / REBOOT_REQUEST).is_file():
                break
            _set_aside(run.artifacts, results, run.artifacts / f"boot{boot}")
            say(f"the guest cut its power (boot {boot}); booting it again on the same disks")
        else:
            raise InfraError(f"the guest asked for a reboot after each of {MAX_BOOTS} boots")
        exit_file = run.artifacts / "exit-code"
        if not exit_file.is_file():
            raise InfraError(
                f"guest powered off without writing an exit code (qemu exit {outcome.returncode});"
                f" console: {run.path('console.log')}"
            )
        run.exit_code = int(exit_file.read_text().strip())


def _boot_once(
    machine: qemu.Machine,
    settings: Settings,
    run: GuestRun,
    say: Report,
    echo: Report | None,
    total_limit: float,
    boot: int,
) -> qemu.BootOutcome:
    try:
        outcome = qemu.run_machine(
            machine,
            console_log=run.artifacts / "console.log",
            qemu_log=run.artifacts / "qemu.log",
            boot_timeout=settings.boot_timeout,
            total_timeout=total_limit,
            echo=echo,
            progress=say,
        )
    finally:
        _collect(machine.results_share, run.artifacts)
    assert outcome.booted_at is not None
    suffix = "" if boot == 1 else f" {boot}"
    run.timings[f"boot{suffix}"] = outcome.booted_at - outcome.started
    run.timings[f"in guest{suffix}"] = outcome.ended - outcome.booted_at
    run.timings.update(
        {f"{name}{suffix}": seconds for name, seconds in _guest_timings(run.artifacts / "timings.txt").items()}
    )
    say(
        f"boot {outcome.booted_at - outcome.started:.0f}s, in guest {outcome.ended - outcome.booted_at:.0f}s"
        f" ({_format_guest_timings(run.timings)})"
    )
    return outcome


def _set_aside(artifacts: Path, results: Path, target: Path) -> None:
    """Move one boot's logs out of the way, so the next boot starts with an empty results share."""
    target.mkdir()
    for item in list(artifacts.iterdir()):
        if item.name != "qemu-command.txt" and not re.fullmatch(r"boot[0-9]+", item.name):
            shutil.move(item, target / item.name)
    for item in results.iterdir():
        if item.is_dir():
            shutil.rmtree(item)
        else:
            item.unlink()


def _collect(results: Path, artifacts: Path) -> None:
    """Copy the guest's results share into the artifacts directory."""
    for item in results.iterdir():
        target = artifacts / item.name
        if item.is_dir():
            shutil.copytree(item, target, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)


def _guest_timings(path: Path) -> dict[str, float]:
    """The guest's own stage timings, "name seconds" per line."""
    timings: dict[str, float] = {}
    if not path.is_file():
        return timings
    for line in path.read_text().splitlines():
        name, _, seconds = line.rpartition(" ")
        try:
            timings[f"guest {name}"] = float(seconds)
        except ValueError:
            continue
    return timings


def _format_guest_timings(timings: dict[str, float]) -> str:
    parts = [
        f"{name.removeprefix('guest ')} {seconds:.0f}s"
        for name, seconds in timings.items()
        if name.startswith("guest ")
    ]
    return ", ".join(parts) or "no guest timings"
