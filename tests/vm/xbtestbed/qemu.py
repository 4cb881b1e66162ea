"""Boot the image under qemu (TCG) and watch its serial console.

The command lines follow the measurements in the project's test bed notes:
KVM hangs on this machine kind, so TCG with `thread=multi`; Xen runs as a
multiboot kernel with `-cpu max,-smap,-smep,-xsave` (without -smap/-smep
dom0 crashes, with xsave dom0 and domU processes crash at random) and
`bootscrub=false`. The plain host boots with `-cpu max,-xsave,-avx,-avx2`:
qemu's default model (qemu64) has no AES-NI or SSE4, so restic's crypto and
hashing ran in software and took twice as long, and ceph-mon (fleet suite)
dies of SIGILL on it. xsave stays off as for Xen; without it the kernel cannot
enable AVX, yet aesni_intel picks its AVX code when CPUID offers AVX and its
self-test dies of "invalid opcode" (udev then waits minutes), so AVX goes too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import Flavour, InfraError
from .image import Image

QEMU = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"

BOOTED_MARKER = "XBTEST-BOOTED"
ERROR_MARKER = "XBTEST-ERROR"

BLANK_DISK_SERIALS = ("xbtest1", "xbtest2", "xbtest3")
BLANK_DISK_SIZE = 4 * 2**30
BOOT_PROGRESS_INTERVAL = 30.0


HOST_CPU = "max,-xsave,-avx,-avx2"
"""The host flavour's CPU model; the module docstring says why."""


@dataclass(frozen=True)
class Machine:
    """What one boot needs: image, flavour, disks and shares."""

    flavour: Flavour
    image: Image
    overlay: Path
    blank_disks: Sequence[Path]
    source_share: Path
    results_share: Path
    guest_timeout: float
    cpu: str | None = None
    """The host flavour's -cpu model; None is HOST_CPU (the xen flavour has its own)."""
    memory_mib: int | None = None
    """The host flavour's RAM; None means 2048 MiB (the xen flavour always gets 3072)."""
    vcpus: int = 2
    """One when two guests share two cores (multi-threaded TCG, one host thread per vCPU)."""

    def kernel_arguments(self) -> str:
        # panic=-1 turns a kernel panic into a reboot, which -no-reboot turns
        # into a qemu exit instead of a silent hang.
        return f"root=/dev/vda rw quiet panic=-1 xenbackup.testbed=run xenbackup.timeout={int(self.guest_timeout)}"

    def command(self) -> list[str]:
        argv = [
            QEMU,
            "-accel", "tcg,thread=multi",
            "-smp", str(self.vcpus),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", "stdio",
            "-nic", "none",
        ]  # fmt: skip
        if self.flavour is Flavour.XEN:
            argv += [
                "-cpu", "max,-smap,-smep,-xsave",
                "-m", "3072",
                "-kernel", os.fspath(self.image.xen),
                "-append",
                "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M "
                f"dom0_max_vcpus={self.vcpus} bootscrub=false",
                "-initrd",
                f"{self.image.kernel} {self.kernel_arguments()} console=hvc0,{self.image.initrd}",
            ]  # fmt: skip
        else:
            argv += [
                "-cpu", self.cpu or HOST_CPU,
                "-m", str(self.memory_mib or 2048),
                "-kernel", os.fspath(self.image.kernel),
                "-initrd", os.fspath(self.image.initrd),
                "-append", f"{self.kernel_arguments()} console=ttyS0",
            ]  # fmt: skip
        # The root disk comes first, so it is /dev/vda. qemu 7.2 takes the
        # serial (the /dev/disk/by-id/virtio-SERIAL name) on the device only.
        disks = [(self.overlay, "qcow2", "xbroot")]
        disks += [(path, "raw", serial) for path, serial in zip(self.blank_disks, BLANK_DISK_SERIALS, strict=True)]
        for path, image_format, serial in disks:
            argv += [
                "-drive", f"file={path},format={image_format},if=none,id={serial}",
                "-device", f"virtio-blk-pci,drive={serial},serial={serial}",
            ]  # fmt: skip
        argv += [
            "-virtfs", f"local,path={self.source_share},mount_tag=src,security_model=none,readonly=on",
            "-virtfs", f"local,path={self.results_share},mount_tag=results,security_model=none",
        ]  # fmt: skip
        return argv


def require_tools() -> None:
    """Fail with one clear line when qemu is not installed."""
    for tool in (QEMU, QEMU_IMG):
        if shutil.which(tool) is None:
            raise InfraError(f"{tool} not found: run `make deps` (tests/vm/provision.sh) first")


def create_overlay(image: Image, directory: Path) -> Path:
    """A qcow2 copy-on-write overlay, so the cached image is never written."""
    overlay = directory / "overlay.qcow2"
    argv = [QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", os.fspath(image.rootfs), os.fspath(overlay)]
    result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60, check=False)
    if result.returncode != 0:
        raise InfraError(f"qemu-img create failed for the overlay: {result.stderr.strip()}")
    return overlay


def create_blank_disks(directory: Path) -> list[Path]:
    """Sparse raw disks; the guest sees them as /dev/disk/by-id/virtio-xbtestN."""
    disks = []
    for serial in BLANK_DISK_SERIALS:
        path = directory / f"{serial}.raw"
        with open(path, "wb") as disk:
            disk.truncate(BLANK_DISK_SIZE)
        disks.append(path)
    return disks


@dataclass
class ConsoleWatch:
    """What the console reader has seen so far (shared with its thread)."""

    booted_at: float | None = None
    errors: list[str] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)
    booted: threading.Event = field(default_factory=threading.Event)

    TAIL_LINES = 60

    def feed(self, line: str, now: float) -> None:
        self.tail.append(line)
        del self.tail[: -self.TAIL_LINES]
        if BOOTED_MARKER in line and self.booted_at is None:
            self.booted_at = now
            self.booted.set()
        if ERROR_MARKER in line:
            self.errors.append(line.split(ERROR_MARKER, 1)[1].strip())


@dataclass(frozen=True)
class BootOutcome:
    """How a boot ended, with the times the harness reports."""

    started: float
    booted_at: float | None
    ended: float
    returncode: int | None
    watch: ConsoleWatch


def run_machine(
    machine: Machine,
    console_log: Path,
    qemu_log: Path,
    boot_timeout: float,
    total_timeout: float,
    echo: Callable[[str], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> BootOutcome:
    """Boot, wait for the runner's marker, then for the guest to power off.

    Raises InfraError when the guest never comes up or overruns; qemu is
    then killed by its PID (never by name).
    """
    watch = ConsoleWatch()
    started = time.monotonic()
    with open(qemu_log, "wb") as qemu_err:
        # setpriv (util-linux) execs qemu with a parent-death signal: the kernel
        # kills qemu if the harness dies without cleaning up.
        proc = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "--", *machine.command()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=qemu_err,
        )
    reader = threading.Thread(
        target=_read_console, args=(proc, console_log, watch, echo), name="qemu-console", daemon=True
    )
    reader.start()
    try:
        _wait_for_boot(proc, watch, started, boot_timeout, console_log, qemu_log, progress)
        remaining = total_timeout - (time.monotonic() - started)
        try:
            proc.wait(timeout=max(remaining, 1))
        except subprocess.TimeoutExpired:
            raise InfraError(
                f"guest overran the overall limit of {total_timeout:.0f}s"
                f" (XENBACKUP_TESTVM_TIMEOUT); console: {console_log}"
            ) from None
    finally:
        _kill(proc)
        reader.join(timeout=10)
    return BootOutcome(started, watch.booted_at, time.monotonic(), proc.returncode, watch)


def _wait_for_boot(
    proc: subprocess.Popen[bytes],
    watch: ConsoleWatch,
    started: float,
    boot_timeout: float,
    console_log: Path,
    qemu_log: Path,
    progress: Callable[[str], None] | None,
) -> None:
    next_progress = started + BOOT_PROGRESS_INTERVAL
    while not watch.booted.wait(timeout=1):
        if progress is not None and time.monotonic() > next_progress:
            progress(f"still booting ({time.monotonic() - started:.0f}s)")
            next_progress += BOOT_PROGRESS_INTERVAL
        if proc.poll() is not None:
            reason = _first_line(qemu_log) or (watch.tail[-1] if watch.tail else "no console output")
            raise InfraError(
                f"qemu exited ({proc.returncode}) before the guest came up: {reason}; console: {console_log}"
            )
        if time.monotonic() - started > boot_timeout:
            last = watch.tail[-1] if watch.tail else "no console output at all"
            raise InfraError(
                f"guest never came up: no {BOOTED_MARKER} on the console within {boot_timeout:.0f}s"
                f" (XENBACKUP_TESTVM_BOOT_TIMEOUT); last console line: {last!r}; console: {console_log}"
            )


def _read_console(
    proc: subprocess.Popen[bytes],
    console_log: Path,
    watch: ConsoleWatch,
    echo: Callable[[str], None] | None,
) -> None:
    assert proc.stdout is not None
    with open(console_log, "wb") as log_file:
        for raw in proc.stdout:
            log_file.write(raw)
            log_file.flush()
            line = raw.decode(errors="replace").rstrip("\r\n")
            watch.feed(line, time.monotonic())
            if echo is not None:
                echo(line)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill our own qemu by PID if it is still running."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _first_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[0] if lines else ""
