"""Run a command in the guest with a hard timeout and a readable failure."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

DEFAULT_TIMEOUT = 120.0


class CommandFailed(AssertionError):
    """A command exited non-zero; the message carries its stderr tail.

    An AssertionError so that pytest shows it as a plain test failure.
    """


def run(
    *argv: str | os.PathLike[str],
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv (never through a shell) and capture text output."""
    args = [os.fspath(arg) for arg in argv]
    try:
        result = subprocess.run(
            args,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=None if env is None else {**os.environ, **env},
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(f"{' '.join(args)}: timed out after {timeout:.0f}s") from exc
    if check and result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise CommandFailed(f"{' '.join(args)}: exit code {result.returncode}\n{tail}")
    return result


def output(*argv: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT) -> str:
    """stdout of a command that must succeed, stripped."""
    return run(*argv, timeout=timeout).stdout.strip()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every regular file below root, keyed by relative path."""
    hashes = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                hashes[path.relative_to(root).as_posix()] = sha256_file(path)
    return hashes


def read_from(path: Path, offset: int) -> str:
    """What a growing log (a guest's console) holds past `offset`; "" while it does not exist."""
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def processes_matching(pattern: str) -> list[tuple[int, str]]:
    """(PID, command line) of every other process whose command line matches, oldest first, as `pgrep -af`
    sees them (arguments joined by spaces). Read from /proc in this process: a poll that spawned pgrep
    took a share of the one vCPU from the very run it waited for."""
    regex = re.compile(pattern)
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = Path(entry.path, "cmdline").read_bytes()
            # Field 22 of stat, counted after the ")" that ends the command name: the start time.
            started = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[19])
        except (OSError, IndexError, ValueError):
            continue
        line = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
        if line and regex.search(line):
            found.append((started, int(entry.name), line))
    return [(pid, line) for _, pid, line in sorted(found)]
