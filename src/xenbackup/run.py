"""The single subprocess runner: argv lists only, a clean environment, typed errors."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

log = logging.getLogger(__name__)

Arg = str | os.PathLike[str]

# A clean PATH: systemd gives units a fixed one too, and sbin must be on it for lvm tools.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STDERR_TAIL_LINES = 20
MASK = "***"


class CommandError(Exception):
    """A command could not be started or ended unsuccessfully."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str, reason: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.reason = reason or describe_returncode(returncode)
        super().__init__(self.message())

    @property
    def program(self) -> str:
        return os.path.basename(self.argv[0]) if self.argv else "?"

    @property
    def stderr_tail(self) -> str:
        """The last stderr lines, without Go stack frames (restic prints them with some fatal errors)."""
        lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
        return "\n".join(_without_go_frames(lines)[-STDERR_TAIL_LINES:])

    def message(self) -> str:
        text = f"{self.program} {self.reason}"
        cause = self.cause()
        return f"{text}: {cause}" if cause else text

    def cause(self) -> str:
        """The stderr line that says why: the first naming an error, else the last that is not a usage hint."""
        chain = _go_error_chain([line for line in self.stderr.strip().splitlines() if line.strip()])
        if chain:
            return chain
        # restic's own verdict, even when retries of its lock removal fill the tail after it.
        fatal = fatal_lines(self.stderr)
        if fatal:
            return fatal[-1]
        lines = [line.strip() for line in self.stderr_tail.splitlines()]
        lines = [line for line in lines if line and not line.startswith("Run `")]
        for line in lines:
            if "error" in line.lower() or "fatal" in line.lower():
                return line
        return lines[-1] if lines else ""


def fatal_lines(stderr: str) -> list[str]:
    """restic's `Fatal: ...` verdicts. Its retry messages and the verdict share stderr without locking, so a
    verdict can start in the middle of a line ("...connection refusedFatal: unable to save snapshot")."""
    return [line[line.index("Fatal: "):].strip() for line in stderr.splitlines() if "Fatal: " in line]


_GO_FRAME = re.compile(r"^\s+\S+\.(go|s):\d+$")


def _frame_lines(lines: Sequence[str]) -> set[int]:
    """Indexes of Go stack frames: a function line followed by its indented file:line."""
    frames: set[int] = set()
    for i, line in enumerate(lines):
        if _GO_FRAME.match(line):
            frames.add(i)
            if i > 0:
                frames.add(i - 1)
    return frames


def _without_go_frames(lines: Sequence[str]) -> list[str]:
    frames = _frame_lines(lines)
    return [line for i, line in enumerate(lines) if i not in frames]


def _go_error_chain(lines: Sequence[str]) -> str:
    """A Go error printed with its stack ("%+v"): the root cause, stack, then each wrapping message.

    Returned outermost first, as Go itself would print it: "unable to create lock in backend: open ...:
    read-only file system". Empty when stderr holds no stack.
    """
    frames = _frame_lines(lines)
    if not frames:
        return ""
    first = min(frames)
    if first == 0:
        return ""
    root = lines[first - 1].strip()
    wraps = [line.strip() for i, line in enumerate(lines) if i > first and i not in frames]
    return ": ".join([*reversed(wraps), root])


class CommandNotFound(CommandError):
    def __init__(self, argv: Sequence[str]) -> None:
        super().__init__(argv, None, "", reason="not found")


def describe_returncode(returncode: int | None) -> str:
    if returncode is None:
        return "failed"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"failed with exit code {returncode}"


def mask(argv: Iterable[str], secrets: Iterable[str] = ()) -> str:
    """Render argv for a log line with every secret replaced."""
    return mask_text(shlex.join(argv), secrets)


def mask_text(text: str, secrets: Iterable[str] = ()) -> str:
    """text with every secret replaced, longest first so that a secret containing another goes whole."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


_URL_REST = re.compile(r"(?P<authority>[^/?#]*)(?P<path>[^?#]*)(?:\?(?P<query>[^#]*))?(?P<fragment>#.*)?", re.S)


def _split_url(url: str) -> tuple[str, re.Match[str]] | None:
    start = url.find("://")
    if start < 0:
        return None
    match = _URL_REST.fullmatch(url, start + 3)
    return (url[:start + 3], match) if match else None


def url_secrets(url: str) -> list[str]:
    """The parts of a URL that must never reach a log: the password of its user:password@, and its query."""
    split = _split_url(url)
    if split is None:
        return []
    _, m = split
    found = []
    if "@" in m["authority"]:
        user, colon, password = m["authority"].rsplit("@", 1)[0].partition(":")
        # A user without a password is often a token ("https://TOKEN@host"), so it goes too.
        found.append(password if colon else user)
    if m["query"]:
        found.append(m["query"])
    return [f for f in found if f]


def mask_url(url: str) -> str:
    """The URL as it may be logged: "rest:https://user:***@host/", "https://hooks.example/x?***"."""
    split = _split_url(url)
    if split is None:
        return url
    head, m = split
    authority = m["authority"]
    if "@" in authority:
        userinfo, host = authority.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        authority = f"{user}:{MASK}@{host}" if colon else f"{MASK}@{host}"
    query = f"?{MASK}" if m["query"] else ("?" if m["query"] == "" else "")
    return f"{head}{authority}{m['path']}{query}{m['fragment'] or ''}"


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    # PATH is kept (it is no secret, and tests put recording fakes on it); sbin must be there for lvm tools.
    path = os.environ.get("PATH") or DEFAULT_PATH
    missing = [d for d in DEFAULT_PATH.split(":") if d not in path.split(":")]
    env = {"PATH": ":".join([path, *missing]), "LC_ALL": "C", "LANG": "C"}
    # HOME matters to tools that keep caches; TERM is harmless.
    for key in ("HOME", "TERM", "TMPDIR"):
        if key in os.environ:
            env[key] = os.environ[key]
    if extra:
        env.update(extra)
    return env


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def _argv(argv: Sequence[Arg]) -> list[str]:
    return [os.fspath(a) for a in argv]


def _spawn(args: list[str], secrets: Iterable[str], env: Mapping[str, str] | None, stdin: IO[bytes] | None,
           stdout: IO[bytes] | int, cwd: str | None) -> subprocess.Popen[bytes]:
    log.debug("+ %s", mask(args, secrets))
    try:
        return subprocess.Popen(args, stdin=stdin if stdin is not None else subprocess.DEVNULL, stdout=stdout,
                                stderr=subprocess.PIPE, env=clean_env(env), cwd=cwd)
    except FileNotFoundError as exc:
        raise CommandNotFound(args) from exc


def run(
    argv: Sequence[Arg],
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    secrets: Iterable[str] = (),
    stdin: IO[bytes] | None = None,
    timeout: float | None = None,
    cwd: str | None = None,
    stdout: IO[bytes] | None = None,
) -> Completed:
    """Run a command to completion, capturing text output (or sending stdout to a file)."""
    args = _argv(argv)
    secrets = list(secrets)
    proc = _spawn(args, secrets, env, stdin, stdout if stdout is not None else subprocess.PIPE, cwd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        _stop(proc)
        out, err = proc.communicate()
        raise CommandError(args, proc.returncode, mask_text((err or b"").decode(errors="replace"), secrets),
                           reason=f"timed out after {timeout:g} s") from exc
    except BaseException:
        # SIGTERM arrives as an exception; the child must not outlive us.
        _stop(proc)
        raise
    # stderr ends up in error messages and the journal; a tool may echo what it was given (a URL, a key).
    result = Completed(tuple(args), proc.returncode, (out or b"").decode(errors="replace"),
                       mask_text((err or b"").decode(errors="replace"), secrets))
    if check and proc.returncode != 0:
        raise CommandError(args, proc.returncode, result.stderr)
    return result


def _pump(args: list[str], proc: subprocess.Popen[bytes], consume: Callable[[IO[bytes]], None],
          secrets: Sequence[str]) -> str:
    """Hand stdout to consume while a thread drains stderr; returns stderr, raises on failure."""
    assert proc.stdout is not None and proc.stderr is not None
    err_chunks: list[bytes] = []
    stderr_pipe = proc.stderr
    # stderr is drained on a thread so a chatty child can never block on a full pipe.
    reader = threading.Thread(target=lambda: err_chunks.extend(iter(lambda: stderr_pipe.read(4096), b"")),
                              daemon=True)
    reader.start()
    try:
        consume(proc.stdout)
        proc.wait()
    except BaseException:
        _stop(proc)
        raise
    finally:
        reader.join(timeout=5)
    stderr = mask_text(b"".join(err_chunks).decode(errors="replace"), secrets)
    if proc.returncode != 0:
        raise CommandError(args, proc.returncode, stderr)
    return stderr


def stream(
    argv: Sequence[Arg],
    on_line: Callable[[str], None],
    *,
    env: Mapping[str, str] | None = None,
    secrets: Iterable[str] = (),
    stdin: IO[bytes] | None = None,
    cwd: str | None = None,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> Completed:
    """Run a long command, handing each stdout line to on_line as it arrives."""
    args = _argv(argv)
    secrets = list(secrets)
    proc = _spawn(args, secrets, env, stdin, subprocess.PIPE, cwd)
    if on_start is not None:
        on_start(proc)
    lines: list[str] = []

    def consume(out: IO[bytes]) -> None:
        for raw in out:
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            on_line(line)

    stderr = _pump(args, proc, consume, secrets)
    return Completed(tuple(args), proc.returncode, "\n".join(lines[-50:]), stderr)


def _stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
    """Ask the child to stop (restic finishes its lock removal on SIGTERM), then insist."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def stream_bytes(
    argv: Sequence[Arg],
    sink: Callable[[bytes], None],
    *,
    env: Mapping[str, str] | None = None,
    secrets: Iterable[str] = (),
    chunk: int = 1 << 20,
) -> None:
    """Run a command and hand its binary stdout to sink in chunks (for restic dump into a device)."""
    args = _argv(argv)
    secrets = list(secrets)
    proc = _spawn(args, secrets, env, None, subprocess.PIPE, None)

    def consume(out: IO[bytes]) -> None:
        while data := out.read(chunk):
            sink(data)

    _pump(args, proc, consume, secrets)
