"""Command line for the test bed: build the image, run guest pytest or a script.

    tests/vm/run-guest build
    tests/vm/run-guest pytest --flavour host [PYTEST_ARG...]
    tests/vm/run-guest script --flavour xen tests/vm/demo/demo-in-guest.sh [ARG...]
    tests/vm/run-guest pytest --machine-of fleet tests/vm/guest/fleet -k sftp

The guest installs the product first: the .deb built here (`--install deb`,
the default) or packaging/install.sh (`--install script`).

`script` streams what the script prints (the guest's console after boot) and
ends with the script's summary.txt, if it wrote one to /mnt/results.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from .config import VM_DIR, Flavour, InfraError, Install, Settings
from .guestrun import GuestRequest, GuestRun, run_in_guest
from .image import ensure_image
from .qemu import BOOTED_MARKER
from .suites import SUITES

_started = time.monotonic()


def report(message: str) -> None:
    """A progress line on stderr, with the seconds since start."""
    print(f"[{time.monotonic() - _started:6.0f}s] {message}", file=sys.stderr, flush=True)


class ConsoleEcho:
    """Print the guest console from the runner's start on (everything with --verbose).

    The runner's lines reach the console through journald, prefixed with a
    timestamp and `testbed-boot.sh[PID]:`; the prefix is dropped here.
    """

    RUNNER_PREFIX = re.compile(r"^\[\s*[0-9.]+\] testbed-boot\.sh\[[0-9]+\]: ")

    def __init__(self, verbose: bool) -> None:
        self.printing = verbose

    def __call__(self, line: str) -> None:
        if BOOTED_MARKER in line:
            self.printing = True
        if self.printing:
            print(self.RUNNER_PREFIX.sub("", line), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="run-guest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build the image if the cache has none for the current key")
    for name, what in (
        ("pytest", "pytest arguments"),
        ("script", "script path (relative to the project) and arguments"),
    ):
        sub = commands.add_parser(name, help=f"boot a guest and run {name} inside")
        sub.add_argument("--flavour", choices=[f.value for f in Flavour], default=Flavour.HOST.value)
        sub.add_argument("--verbose", action="store_true", help="also print the console during boot")
        sub.add_argument("--install", choices=[i.value for i in Install], default=Install.DEB.value,
                         help="install the product with the .deb built here (default) or packaging/install.sh")
        sub.add_argument("--machine-of", choices=sorted(SUITES), metavar="SUITE",
                         help="boot with that suite's qemu machine (CPU model, memory), e.g. fleet for Ceph")
        sub.add_argument("arguments", nargs=argparse.REMAINDER, help=what)
    options = parser.parse_args(argv)

    try:
        # One boot by hand has the machine's cores to itself.
        settings = replace(Settings.from_environment(), parallel=1)
        if options.command == "build":
            image, built = ensure_image(settings, settings.artifacts_dir / "image-build.log", report)
            report(f"image {image.directory} {'built' if built else 'already cached'}")
            return 0
        flavour = Flavour(options.flavour)
        shape = SUITES[options.machine_of] if options.machine_of else None
        cpu, memory_mib = (shape.cpu, shape.memory_mib) if shape else (None, None)
        if options.command == "script":
            if not options.arguments:
                parser.error("script: name the script to run, e.g. tests/vm/demo/demo-in-guest.sh")
            request = GuestRequest.script(
                flavour, options.arguments[0], options.arguments[1:], Install(options.install), cpu, memory_mib
            )
        else:
            request = GuestRequest.pytest(
                flavour, options.arguments or [f"{VM_DIR.name}/guest"], install=Install(options.install),
                cpu=cpu, memory_mib=memory_mib,
            )
    except InfraError as exc:
        report(f"error: {exc}")
        return 2
    run = run_in_guest(request, settings, report, echo=ConsoleEcho(options.verbose))
    return summarize(run)


def summarize(run: GuestRun) -> int:
    """Print timings, the guest's summary.txt and the verdict; return the exit code."""
    print()
    print(f"== {run.request.name}: artifacts in {_display(run.artifacts)}")
    for stage, seconds in run.timings.items():
        print(f"   {stage:<16} {seconds:7.1f}s")
    summary = run.path("summary.txt")
    if summary.is_file():
        print()
        print(summary.read_text().rstrip())
    print()
    if run.error is not None:
        print(f"FAILED: test bed error: {run.error}")
        return 2
    verdict = "PASSED" if run.exit_code == 0 else f"FAILED (exit code {run.exit_code})"
    print(f"{verdict}: {' '.join(run.request.arguments)} in the {run.request.flavour.value} flavour")
    return 0 if run.exit_code == 0 else 1


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
