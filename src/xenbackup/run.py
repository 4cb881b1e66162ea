"""The single subprocess runner: argv lists only, a clean environment, typed errors."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Protocol

from . import headstart

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
        after_retries = _verdict_after_retries(self.stderr)
        if after_retries:
            return after_retries
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


_RETRY_NOTICE = " returned error, retrying after "
_MAX_WRAPS = 4
_LIBRARY_LOG = "also, the following messages were logged by a library:"


def _verdict_after_retries(stderr: str) -> str:
    """restic's verdict after its backend gave up retrying, when the error carries no stack and is no `Fatal:`.

    restic prints such an error with "%+v": the cause on one line, then each wrapping message on its own
    ("Get ...: connection refused" / "unable to create lock in backend"). Without this, the last retry
    notice would pass for the reason. Returned outermost first, as Go's "%v" would print it.
    """
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    retries = [i for i, line in enumerate(lines) if _RETRY_NOTICE in line]
    if not retries:
        return ""
    tail = lines[retries[-1] + 1:]
    if _LIBRARY_LOG in tail:
        tail = tail[:tail.index(_LIBRARY_LOG)]
    tail = [line for line in tail if not line.startswith(("Run `", "the `unlock` command"))]
    # A wrapped error is a few lines; more is output of another kind, left to the general rule.
    return ": ".join(reversed(tail)) if len(tail) <= _MAX_WRAPS else ""


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
    if _rehearsing.get():
        raise Rehearsed(args, clean_env(env), cwd, _stdin_name(stdin), secrets)
    adopted = _adopt(args, secrets, env, stdin, cwd) if stdout is None and timeout is None else None
    if adopted is not None:
        out, err = _read_all(adopted)
        returncode = adopted.wait()
    else:
        proc = _spawn(args, secrets, env, stdin, stdout if stdout is not None else subprocess.PIPE, cwd)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            # A short grace: the command has had its time, and it may ignore SIGTERM (cleanup's children
            # inherit cleanup's SIG_IGN, and restic 0.14 handles only SIGINT).
            _stop(proc, grace=5.0)
            out, err = proc.communicate()
            raise CommandError(args, proc.returncode, mask_text((err or b"").decode(errors="replace"), secrets),
                               reason=f"timed out after {timeout:g} s") from exc
        except BaseException:
            # SIGTERM arrives as an exception; the child must not outlive us.
            _stop(proc)
            raise
        returncode = proc.returncode
    # stderr ends up in error messages and the journal; a tool may echo what it was given (a URL, a key).
    result = Completed(tuple(args), returncode, (out or b"").decode(errors="replace"),
                       mask_text((err or b"").decode(errors="replace"), secrets))
    if check and returncode != 0:
        raise CommandError(args, returncode, result.stderr)
    return result


def _pump(args: list[str], proc: Child, consume: Callable[[IO[bytes]], None],
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


class Child(Protocol):
    """A running command: a subprocess.Popen, or a process the head start began (Adopted)."""

    pid: int
    returncode: int | None
    stdout: IO[bytes] | None
    stderr: IO[bytes] | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


class Adopted:
    """A process headstart started before this interpreter had loaded the runner, as the runner's own."""

    def __init__(self, started: headstart.Started) -> None:
        self.pid = started.pid
        self.returncode: int | None = None
        self.stdout: IO[bytes] | None = os.fdopen(started.stdout, "rb")
        self.stderr: IO[bytes] | None = os.fdopen(started.stderr, "rb")

    def _reap(self, flags: int) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, flags)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        return self._reap(os.WNOHANG)

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            code = self._reap(0)
            assert code is not None
            return code
        deadline = time.monotonic() + timeout
        while (code := self._reap(os.WNOHANG)) is None:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired([str(self.pid)], timeout)
            time.sleep(0.05)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Rehearsed(Exception):
    """What run() or stream() would have started under rehearsal(): the command, its full environment, and which
    of its strings are secrets."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: str | None, stdin: str | None,
                 secrets: list[str]) -> None:
        super().__init__(argv[0])
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.stdin = stdin
        self.secrets = secrets


_rehearsing: contextvars.ContextVar[bool] = contextvars.ContextVar("rehearsing", default=False)


@contextlib.contextmanager
def rehearsal() -> Iterator[None]:
    """Inside, run() and stream() start nothing and raise Rehearsed instead (see headstart)."""
    token = _rehearsing.set(True)
    try:
        yield
    finally:
        _rehearsing.reset(token)


def _stdin_name(stdin: IO[bytes] | None) -> str | None:
    """The file stdin reads, from its start; "" for anything else (never what a head start opened)."""
    if stdin is None:
        return None
    name = getattr(stdin, "name", None)
    return name if isinstance(name, str) and stdin.seekable() and stdin.tell() == 0 else ""


def _adopt(args: list[str], secrets: Sequence[str], env: Mapping[str, str] | None, stdin: IO[bytes] | None,
           cwd: str | None, first_backup: bool = False) -> Adopted | None:
    """The process a head start began, if it runs exactly this command. With `first_backup` (the backup
    step's first long command, the one its head start was for), any other backup process is stopped."""
    if not headstart.holds():
        return None
    full = clean_env(env)
    stdin_name = _stdin_name(stdin)
    started = headstart.take_if(lambda s: s.runs(args, full, cwd, stdin_name))
    if started is not None:
        log.info("%s was started %.2f s ahead, before this step loaded its code (pid %d)",
                 os.path.basename(args[0]), time.monotonic() - started.at, started.pid)
        log.debug("+ %s", mask(args, secrets))
        return Adopted(started)
    if first_backup:
        other = headstart.take_if(lambda s: s.step == headstart.BACKUP)
        if other is not None:
            log.warning("the command started ahead (pid %d) is not the one this step runs; stopping it",
                        other.pid)
            stop_adopted(Adopted(other))
    return None


def stop_adopted(child: Adopted) -> None:
    """Stop a head-started process and close its pipes."""
    _stop(child)
    for pipe in (child.stdout, child.stderr):
        if pipe is not None:
            pipe.close()


def stop_head_start() -> None:
    """Stop the head start's process if nothing took it: the step ended before it came to that command, or
    the key check the last run left no longer matches this run's."""
    started = headstart.take()
    if started is None:
        return
    if started.step == headstart.BACKUP:
        log.warning("the command started ahead (pid %d) was not used; stopping it", started.pid)
    else:
        log.info("stopped the key check the last run left (pid %d): this run did not use it (the config or the "
                 "repository changed, or the step ended before its key check)", started.pid)
    stop_adopted(Adopted(started))


def _read_all(child: Adopted) -> tuple[bytes, bytes]:
    """Everything a head-started process writes, until it ends (subprocess's communicate, for Adopted)."""
    assert child.stdout is not None and child.stderr is not None
    err: list[bytes] = []
    stderr_pipe = child.stderr
    reader = threading.Thread(target=lambda: err.append(stderr_pipe.read()), daemon=True)
    reader.start()
    try:
        out = child.stdout.read()
        child.wait()
    except BaseException:
        _stop(child)
        raise
    finally:
        reader.join(timeout=5)
        child.stdout.close()
        stderr_pipe.close()
    return out, b"".join(err)


def stream(
    argv: Sequence[Arg],
    on_line: Callable[[str], None],
    *,
    env: Mapping[str, str] | None = None,
    secrets: Iterable[str] = (),
    stdin: IO[bytes] | None = None,
    cwd: str | None = None,
    on_start: Callable[[Child], None] | None = None,
) -> Completed:
    """Run a long command, handing each stdout line to on_line as it arrives."""
    args = _argv(argv)
    secrets = list(secrets)
    if _rehearsing.get():
        raise Rehearsed(args, clean_env(env), cwd, _stdin_name(stdin), secrets)
    proc: Child = (_adopt(args, secrets, env, stdin, cwd, first_backup=True)
                   or _spawn(args, secrets, env, stdin, subprocess.PIPE, cwd))
    if on_start is not None:
        on_start(proc)
    lines: list[str] = []

    def consume(out: IO[bytes]) -> None:
        for raw in out:
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            on_line(line)

    stderr = _pump(args, proc, consume, secrets)
    return Completed(tuple(args), proc.wait(), "\n".join(lines[-50:]), stderr)


def _stop(proc: Child, grace: float = 20.0) -> None:
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

    def consume(out: IO[bytes]) -> None:
        while data := out.read(chunk):
            sink(data)

    stream_output(argv, consume, env=env, secrets=secrets)


def stream_output(
    argv: Sequence[Arg],
    consume: Callable[[IO[bytes]], None],
    *,
    env: Mapping[str, str] | None = None,
    secrets: Iterable[str] = (),
) -> None:
    """Run a command and let consume read its binary stdout as a stream (a tar of restic dump)."""
    args = _argv(argv)
    secrets = list(secrets)
    _pump(args, _spawn(args, secrets, env, None, subprocess.PIPE, None), consume, secrets)
