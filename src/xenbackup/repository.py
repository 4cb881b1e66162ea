"""restic adapter: init, backup, snapshots, forget, check, restore, dump."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import IO, TypeVar

from . import envfile
from .config import RepositoryConfig
from .model import Retention
from .run import Child, CommandError, Completed, fatal_lines, run, stream, stream_bytes, stream_output, url_secrets
from .state import write_atomic

log = logging.getLogger(__name__)

T = TypeVar("T")

CREDENTIAL = "restic-password"
# KEY=VALUE lines like [repository] environment_file (S3 keys), for admins who keep them in a credential store.
ENV_CREDENTIAL = "restic-environment"

# `restic unlock` removes every lock older than this, whatever host holds it (restic's staleTimeout).
RESTIC_STALE_AGE = 30 * 60
# restic 0.16 added --retry-lock (restic PR #4107); older ones fail at once on a held lock.
RETRY_LOCK_SINCE = (0, 16, 0)
# Our own wait for restic < 0.16: the first pause, and the longest one between two attempts.
LOCK_RETRY_FIRST = 5.0
LOCK_RETRY_MAX = 120.0


class RepositoryError(Exception):
    pass


class RepositoryLocked(RepositoryError):
    """Another process held the repository's lock for longer than [repository] lock_wait."""

    def __init__(self, message: str, holder: LockHolder) -> None:
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class LockHolder:
    """Who holds the lock a restic command ran into, as restic's error names it."""

    pid: int
    host: str
    user: str
    exclusive: bool
    since: str

    def describe(self) -> str:
        kind = "an exclusive lock" if self.exclusive else "a lock"
        since = f", taken {self.since}" if self.since else ""
        return f"{kind} of PID {self.pid} on {self.host} ({self.user}{since})"


_LOCK_HELD = re.compile(r"repository is already locked (?P<exclusive>exclusively )?by PID (?P<pid>\d+) on "
                        r"(?P<host>\S+) by (?P<user>.*?) \(UID")
_LOCK_CREATED = re.compile(r"lock was created at (?P<at>[^(\n]+?)\s*\(")


def parse_lock_conflict(stderr: str) -> LockHolder | None:
    """The holder named by restic's "repository is already locked" error, or None for any other failure."""
    m = _LOCK_HELD.search(stderr)
    if m is None:
        return None
    created = _LOCK_CREATED.search(stderr, m.end())
    return LockHolder(pid=int(m.group("pid")), host=m.group("host"), user=m.group("user"),
                      exclusive=bool(m.group("exclusive")), since=created.group("at") if created else "")


@dataclass(frozen=True)
class Lock:
    """One lock file of the repository (`restic cat lock`)."""

    id: str
    time: datetime
    exclusive: bool
    hostname: str
    username: str
    pid: int

    def age(self, now: datetime) -> float:
        return (now - self.time).total_seconds()


def parse_lock(lock_id: str, text: str) -> Lock:
    try:
        d = json.loads(text)
        # Go prints nanoseconds; Python reads at most microseconds.
        stamp = re.sub(r"(\.\d{6})\d+", r"\1", str(d["time"])).replace("Z", "+00:00")
        return Lock(id=lock_id, time=datetime.fromisoformat(stamp), exclusive=bool(d.get("exclusive")),
                    hostname=str(d.get("hostname", "")), username=str(d.get("username", "")),
                    pid=int(d.get("pid", 0)))
    except (ValueError, KeyError, TypeError) as exc:
        raise RepositoryError(f"restic cat lock {lock_id[:8]} printed JSON xenbackup cannot read: {exc}") from None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def removable_locks(locks: Sequence[Lock], here: str, now: datetime,
                    alive: Callable[[int], bool] = pid_alive) -> list[Lock] | None:
    """This host's locks whose process is gone, if `restic unlock` would remove nothing else; else None.

    restic's unlock also removes any lock older than 30 minutes, even another host's; xenbackup never
    removes another host's lock, so it does not run unlock while one of those exists.
    """
    dead = [lk for lk in locks if lk.hostname == here and not alive(lk.pid)]
    others_stale = [lk for lk in locks if lk not in dead and lk.age(now) > RESTIC_STALE_AGE]
    return None if others_stale else dead


_SFTP_SHORT = re.compile(r"^sftp:(?:(?P<user>[^@/]+)@)?(?P<host>\[[^\]]+\]|[^:/]+):")


def sftp_argv(cfg: RepositoryConfig) -> list[str]:
    """The ssh command that opens the sftp session of an sftp: repository, with the configured key and options."""
    if cfg.url.startswith("sftp://"):
        from urllib.parse import urlsplit  # with ipaddress: for sftp: URLs only

        parts = urlsplit(cfg.url)
        user, host, port = parts.username, parts.hostname, parts.port
    else:
        m = _SFTP_SHORT.match(cfg.url)
        user, host, port = (m.group("user"), m.group("host"), None) if m else (None, None, None)
    if not host:
        raise RepositoryError(f"cannot find the host in the sftp repository URL {cfg.display_url}")
    # BatchMode: under systemd no one can answer a password or host key prompt; fail instead of hanging.
    argv = ["ssh", "-o", "BatchMode=yes"]
    if cfg.sftp_identity:
        argv += ["-i", cfg.sftp_identity, "-o", "IdentitiesOnly=yes"]
    if cfg.sftp_known_hosts:
        argv += ["-o", f"UserKnownHostsFile={cfg.sftp_known_hosts}", "-o", "StrictHostKeyChecking=yes"]
    for option in cfg.sftp_options:
        argv += ["-o", option]
    if port:
        argv += ["-p", str(port)]
    return [*argv, f"{user}@{host}" if user else host, "-s", "sftp"]


def sftp_command(cfg: RepositoryConfig) -> str | None:
    """restic's -o sftp.command for the configured key, known_hosts and ssh options; None: restic's own ssh."""
    if not cfg.url.startswith("sftp:") or not (cfg.sftp_identity or cfg.sftp_known_hosts or cfg.sftp_options):
        return None
    return " ".join(sftp_argv(cfg))


_VERSION = re.compile(r"restic (\d+)\.(\d+)\.(\d+)")
_retry_lock_support: dict[str, bool] = {}


def _binary_identity(program: str) -> str | None:
    """The restic binary as exec finds it on PATH, with what changes when it is replaced (an upgrade).

    Not shutil.which: shutil loads the bz2 and lzma modules, a cost the backup step would pay in the snapshot's
    lifetime."""
    dirs = [""] if "/" in program else os.get_exec_path()
    for path in (os.path.join(d, program) for d in dirs):
        try:
            st = os.stat(path)
        except OSError:
            continue
        if os.access(path, os.X_OK):
            return f"{os.path.realpath(path)}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    return None


def _read_json(path: str) -> dict[str, object]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class Progress:
    percent: float | None
    bytes_done: int
    total_bytes: int | None
    seconds_remaining: int | None
    files_done: int


@dataclass(frozen=True)
class BackupSummary:
    snapshot_id: str
    data_added: int
    total_bytes: int
    files: int
    duration: float
    files_unmodified: int = 0
    """Files restic took from the parent snapshot without reading them."""


@dataclass(frozen=True)
class Node:
    path: str
    type: str
    size: int


@dataclass(frozen=True)
class Snapshot:
    id: str
    short_id: str
    time: str
    hostname: str
    paths: tuple[str, ...]
    tags: tuple[str, ...] = field(default=())

    def tag_value(self, key: str) -> str | None:
        prefix = f"{key}:"
        for tag in self.tags:
            if tag.startswith(prefix):
                return tag[len(prefix):]
        return None


def parse_progress(line: str) -> Progress | BackupSummary | None:
    """One line of `restic backup --json`: a status, the summary, or something else (None)."""
    try:
        msg = json.loads(line)
    except ValueError:
        return None
    if not isinstance(msg, dict):
        return None
    kind = msg.get("message_type")
    if kind == "status":
        pct = msg.get("percent_done")
        return Progress(
            percent=float(pct) * 100 if isinstance(pct, (int, float)) and msg.get("total_bytes") else None,
            bytes_done=int(msg.get("bytes_done", 0)),
            total_bytes=int(msg["total_bytes"]) if msg.get("total_bytes") else None,
            seconds_remaining=int(msg["seconds_remaining"]) if msg.get("seconds_remaining") else None,
            files_done=int(msg.get("files_done", 0)),
        )
    if kind == "summary":
        return BackupSummary(
            snapshot_id=str(msg.get("snapshot_id", "")),
            data_added=int(msg.get("data_added", 0)),
            total_bytes=int(msg.get("total_bytes_processed", 0)),
            files=int(msg.get("total_files_processed", 0)),
            duration=float(msg.get("total_duration", 0.0)),
            files_unmodified=int(msg.get("files_unmodified", 0)),
        )
    return None


def parse_snapshots(stdout: str) -> list[Snapshot]:
    try:
        data = json.loads(stdout or "[]")
        return [Snapshot(id=s["id"], short_id=s.get("short_id", s["id"][:8]), time=s["time"],
                         hostname=s.get("hostname", ""), paths=tuple(s.get("paths", [])),
                         tags=tuple(s.get("tags") or [])) for s in data or []]
    except (ValueError, KeyError, TypeError) as exc:
        raise RepositoryError(f"restic snapshots printed JSON xenbackup cannot read: {exc}") from None


def read_environment_file(path: str) -> dict[str, str]:
    try:
        return envfile.parse(path)
    except envfile.EnvFileError as exc:
        raise RepositoryError(str(exc)) from None


def ssh_line(stderr: str) -> str | None:
    """ssh's own verdict in restic's stderr: the last line before restic's `Fatal:`, after ssh's `@` banner."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    fatal = next((i for i, line in enumerate(lines) if "Fatal: " in line), None)
    before = [line for line in lines[:fatal] if not line.startswith("@")] if fatal is not None else []
    return before[-1] if before else None


def open_failure(stderr: str, sftp: bool = False) -> str:
    """restic's reason for not opening a repository, from its stderr.

    Its `Fatal:` line says only that the sftp session ended (EOF); ssh's own verdict ("Host key verification
    failed.") is the line before it, when restic got to forward it."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    fatal = next((line for line in lines if "Fatal: " in line), None)
    if fatal is None:
        return lines[0] if lines else "no answer"
    verdict = fatal_lines(fatal)[0]
    said = ssh_line(stderr) if sftp else None
    return f"{said}; {verdict}" if said else verdict


class _Counted:
    """A sink that counts what passes through it."""

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self.sink = sink
        self.size = 0

    def __call__(self, data: bytes) -> None:
        self.size += len(data)
        self.sink(data)


def _tar_files_in_order(stream: IO[bytes], files: Sequence[str], sink: Callable[[bytes], None],
                        finished: Callable[[str, int], None], source: str) -> None:
    """Hand the regular files of a tar stream to sink, checking that they are exactly `files`, in order."""
    import tarfile  # only a restore of a segmented image needs it, not the steps of a backup

    wanted = iter(files)
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            expected = next(wanted, None)
            # restic names a dumped tree's members without the leading slash of the snapshot's paths.
            if expected is None or member.name.lstrip("/") != expected.lstrip("/"):
                raise RepositoryError(f"restic dump of {source} holds {member.name} where {expected or 'nothing'} "
                                      "was expected; the image is not restored from it")
            data = tar.extractfile(member)
            assert data is not None  # a regular file always has a reader
            counted = _Counted(sink)
            while chunk := data.read(1 << 20):
                counted(chunk)
            finished(expected, counted.size)
    missing = next(wanted, None)
    if missing is not None:
        raise RepositoryError(f"restic dump of {source} ended before {missing}")
    while stream.read(1 << 16):  # the end-of-archive blocks, so restic never blocks on a full pipe
        pass


class Restic:
    def __init__(self, cfg: RepositoryConfig, restic: str = "restic",
                 credentials_dir: str | None = None, version_cache: str | None = None) -> None:
        self.cfg = cfg
        self.bin = restic
        self.version_cache = version_cache
        self.host = cfg.hostname
        # restic records the kernel's host name in its locks, whatever --host says.
        self.machine = os.uname().nodename
        self.credentials_dir = credentials_dir if credentials_dir is not None else os.environ.get(
            "CREDENTIALS_DIRECTORY")
        self._extra_env: dict[str, str] | None = None
        self._command_limit: float | None = None

    def _variant(self, cfg: RepositoryConfig) -> Restic:
        other = Restic(cfg, self.bin, self.credentials_dir, self.version_cache)
        other._extra_env = self._extra_env
        other._command_limit = self._command_limit
        return other

    def giving_up_after(self, seconds: float) -> Restic:
        """The same repository, each of its lock-free commands (open, list and clear locks) killed after
        `seconds`. restic 0.14 retries an unreachable remote repository for minutes before it fails; the
        cleanup step, which only tidies locks, must not hold the unit in "deactivating" for that long."""
        bounded = self._variant(self.cfg)
        bounded._command_limit = seconds
        return bounded

    def waiting_at_most(self, seconds: int) -> Restic:
        """The same repository with a shorter lock wait, for steps that systemd gives little time (cleanup)."""
        return self._variant(replace(self.cfg, lock_wait=min(seconds, self.cfg.lock_wait)))

    # --- secrets ---

    def _credential(self, name: str) -> str | None:
        if self.credentials_dir:
            cred = os.path.join(self.credentials_dir, name)
            if os.path.exists(cred):
                return cred
        return None

    def password_file(self) -> str:
        """The systemd credential if the unit passed one, else the configured 0600 file."""
        return self._credential(CREDENTIAL) or self.cfg.password_file

    def ensure_password(self) -> str:
        path = self.password_file()
        if os.path.exists(path):
            return path
        if not self.cfg.is_local:
            raise RepositoryError(f"password file {path} is missing; a remote repository needs its password")
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            import secrets  # only here: it loads OpenSSL, which no backup step needs

            f.write(secrets.token_urlsafe(32) + "\n")
        log.warning("generated a new repository password in %s: keep a copy off this host, "
                    "without it the backups cannot be read", path)
        return path

    def environment_files(self) -> list[str]:
        """The KEY=VALUE files restic's environment comes from, the later one winning."""
        cred = self._credential(ENV_CREDENTIAL)
        return [p for p in (self.cfg.environment_file, cred) if p]

    def env(self) -> dict[str, str]:
        if self._extra_env is None:
            extra: dict[str, str] = {}
            for path in self.environment_files():
                extra.update(read_environment_file(path))
            self._extra_env = extra
        return {
            **self._extra_env,
            "RESTIC_REPOSITORY": self.cfg.url,
            "RESTIC_PASSWORD_FILE": self.password_file(),
            "RESTIC_CACHE_DIR": self.cfg.cache_dir,
            "RESTIC_PROGRESS_FPS": "1",
        }

    def environment_keys(self) -> set[str]:
        """The names the environment files set (see environment_files)."""
        self.env()
        return set(self._extra_env or {})

    def secrets(self) -> list[str]:
        self.env()
        return [v for k, v in (self._extra_env or {}).items() if "KEY" in k or "SECRET" in k or "PASS" in k
                or "TOKEN" in k] + url_secrets(self.cfg.url)

    # --- running restic ---

    def global_args(self) -> list[str]:
        """Options every command that talks to the repository gets."""
        args = []
        if self.cfg.limit_upload:
            args += ["--limit-upload", str(self.cfg.limit_upload)]
        if self.cfg.limit_download:
            args += ["--limit-download", str(self.cfg.limit_download)]
        command = sftp_command(self.cfg)
        if command:
            args += ["-o", f"sftp.command={command}"]
        return args

    def argv(self, *args: str) -> list[str]:
        return [self.bin, *self.global_args(), *args]

    def has_retry_lock(self) -> bool:
        """Whether this restic waits for locks itself (--retry-lock).

        Asked once per binary: the answer is kept in version_cache under the binary's identity, so the
        backup step, inside the snapshot's lifetime, spawns no `restic version` that an earlier step asked."""
        known = _retry_lock_support.get(self.bin)
        if known is not None:
            return known
        identity = _binary_identity(self.bin) if self.version_cache else None
        found = _read_json(self.version_cache).get(identity) if self.version_cache and identity else None
        if isinstance(found, bool):
            known = found
        else:
            out = run([self.bin, "version"], check=False).stdout
            m = _VERSION.search(out)
            known = m is not None and tuple(int(g) for g in m.groups()) >= RETRY_LOCK_SINCE
            if self.version_cache and identity and m is not None:
                try:
                    write_atomic(self.version_cache, json.dumps({identity: known}))
                except OSError as exc:
                    # A cache that cannot be written costs one `restic version` next time, nothing more.
                    log.debug("cannot keep restic's version in %s: %s", self.version_cache, exc)
        _retry_lock_support[self.bin] = known
        return known

    def _masked(self, exc: CommandError) -> CommandError:
        """The error with secrets masked and the repository named: in a fleet, which one failed matters."""
        stderr = exc.stderr
        for secret in self.secrets():
            if secret:
                stderr = stderr.replace(secret, "***")
        where = f"on repository {self.cfg.display_url}"
        reason = exc.reason if where in exc.reason else f"{exc.reason} {where}"
        return CommandError(exc.argv, exc.returncode, stderr, reason)

    def _with_lock_wait(self, argv: list[str], attempt: Callable[[list[str]], T]) -> T:
        """Run attempt(argv); while another process holds the repository lock, wait up to lock_wait."""
        wait = self.cfg.lock_wait
        if wait and self.has_retry_lock():
            argv = [argv[0], "--retry-lock", f"{wait}s", *argv[1:]]
            wait = 0
        start = time.monotonic()
        pause = LOCK_RETRY_FIRST
        cleared = False
        waited = False
        while True:
            try:
                result = attempt(argv)
            except CommandError as exc:
                holder = parse_lock_conflict(exc.stderr)
                if holder is None:
                    raise self._masked(exc) from None
                if holder.host == self.machine and not pid_alive(holder.pid) and not cleared:
                    # A restic killed on this host left its lock; restic 0.14 does not step over it itself.
                    log.warning("the repository lock of PID %d on this host is left from a process that is "
                                "gone; removing it", holder.pid)
                    self.unlock_stale()
                    cleared = True
                    continue
                left = self.cfg.lock_wait - (time.monotonic() - start) if wait else 0
                fields = {"lock_host": holder.host, "lock_pid": holder.pid}
                if left <= 0:
                    log.error("repository %s is still locked by %s", self.cfg.display_url, holder.describe(),
                              extra={"fields": fields})
                    raise RepositoryLocked(
                        f"repository {self.cfg.display_url} is locked by {holder.describe()}; gave up after "
                        f"waiting {self.cfg.lock_wait} s ([repository] lock_wait)", holder) from None
                sleep = min(pause * random.uniform(0.8, 1.2), left)
                log.warning("repository %s is locked by %s; trying again in %.1f s (waiting up to %.0f s more)",
                            self.cfg.display_url, holder.describe(), sleep, left, extra={"fields": fields})
                time.sleep(sleep)
                pause = min(pause * 2, LOCK_RETRY_MAX)
                waited = True
                continue
            if waited:
                log.info("got the repository lock after waiting %.0f s", time.monotonic() - start,
                         extra={"fields": {"lock_waited": round(time.monotonic() - start)}})
            return result

    def run_argv(self, argv: Sequence[str]) -> Completed:
        """Run an argv built by argv() or one of the *_argv methods, waiting for a held lock."""
        return self._with_lock_wait(list(argv), lambda a: run(a, env=self.env(), secrets=self.secrets()))

    def _run(self, *args: str) -> Completed:
        return self.run_argv(self.argv(*args))

    def _run_unlocked(self, *args: str) -> Completed:
        """A command that takes no repository lock (it runs with --no-lock, or is unlock itself)."""
        try:
            return run(self.argv(*args), env=self.env(), secrets=self.secrets(), timeout=self._command_limit)
        except CommandError as exc:
            raise self._masked(exc) from None

    # --- repository ---

    def is_initialized(self) -> bool:
        return self._open_error() is None

    def _open_error(self) -> str | None:
        """None when the repository opens, else why not (restic's first line)."""
        if self.cfg.is_local:
            return None if os.path.exists(os.path.join(self.cfg.url, "config")) else "no repository there"
        return self.read_config()

    def read_config(self) -> str | None:
        """None when restic decrypts the repository's config, else restic's first line saying why not."""
        # --no-lock: a prune elsewhere in the fleet may hold an exclusive lock, and this only reads.
        probe = run(self.argv("cat", "config", "--no-lock"), env=self.env(), secrets=self.secrets(), check=False,
                    timeout=self._command_limit)
        if probe.returncode == 0:
            return None
        return self._why_not(probe.stderr)

    def _why_not(self, restic_stderr: str) -> str:
        """Why restic could not open the repository, from its stderr (and ssh's, for sftp)."""
        sftp = self.cfg.url.startswith("sftp:")
        if sftp and ssh_line(restic_stderr) is None and any(
                lost in restic_stderr for lost in ("sftp session", "file already closed")):
            return self._ask_ssh(restic_stderr)
        return open_failure(restic_stderr, sftp=sftp)

    def _ask_ssh(self, restic_stderr: str) -> str:
        """Why the sftp session ended, from ssh itself, when restic lost ssh's last words.

        restic forwards ssh's stderr from a goroutine of its own, and its Fatal exit can beat that goroutine
        (seen in the test bed): then all it says is "EOF". The same ssh, run once more with nothing on its
        stdin, says why (a refused host key, a refused login) on a stderr that is ours."""
        verdict = open_failure(restic_stderr)
        try:
            answer = run(sftp_argv(self.cfg), secrets=self.secrets(), check=False, timeout=60)
        except CommandError as exc:  # timed out
            return f"ssh: {exc.reason}; {verdict}"
        said = [line.strip() for line in answer.stderr.splitlines() if line.strip() and not line.startswith("@")]
        return f"ssh: {said[-1]}; {verdict}" if answer.returncode != 0 and said else verdict

    def ensure_initialized(self, opening: Callable[[], object] | None = None) -> None:
        """On first use, create the local repository (and its password); otherwise check that its key opens.

        `opening` is a command that opens the repository anyway (and fails as the key check would): it then
        takes the key check's place, and the repository is opened once instead of twice."""
        self.ensure_password()
        if opening is not None and not self.cfg.is_local:
            opening()
            return
        error = self._open_error()
        if error is None:
            if self.cfg.is_local:
                if opening is not None:
                    opening()
                else:
                    self._check_key()
            return
        if not self.cfg.is_local:
            raise RepositoryError(f"repository {self.cfg.display_url} cannot be opened: {error} (if it was "
                                  "never initialised, run `xenbackup init` once)")
        self.init()

    def _check_key(self) -> None:
        """Decrypt the repository's config as any backup would: a wrong password fails here, before LVM."""
        why = self.read_config()
        if why is not None:
            raise RepositoryError(f"repository {self.cfg.display_url} cannot be opened: {why}")

    def init(self) -> None:
        self.ensure_password()
        log.info("initialising restic repository %s", self.cfg.display_url)
        self._run_unlocked("init")

    def backup_argv(self, paths: Sequence[str], tags: Iterable[str], host: str,
                    stdin_filename: str | None = None, options: Sequence[str] = ()) -> list[str]:
        argv = self.argv("backup", "--json", "--host", host, "--compression", self.cfg.compression, *options)
        for tag in tags:
            argv += ["--tag", tag]
        if stdin_filename is not None:
            return [*argv, "--stdin", "--stdin-filename", stdin_filename]
        return [*argv, "--one-file-system", "--", *paths]

    def store_opening(self, path: str, tags: Iterable[str], host: str) -> BackupSummary:
        """Back up one small file as the run's first repository open: a failure to open reads as the key
        check's would."""
        try:
            return self.backup([path], tags, host, lambda p: None)
        except CommandError as exc:
            hint = "" if self.cfg.is_local else " (if it was never initialised, run `xenbackup init` once)"
            raise RepositoryError(f"repository {self.cfg.display_url} cannot be opened or written: "
                                  f"{self._why_not(exc.stderr)}{hint}") from None

    def backup(self, paths: Sequence[str], tags: Iterable[str], host: str,
               on_progress: Callable[[Progress], None], cwd: str | None = None,
               stdin: IO[bytes] | None = None, stdin_filename: str | None = None,
               on_start: Callable[[Child], None] | None = None,
               options: Sequence[str] = ()) -> BackupSummary:
        summary: list[BackupSummary] = []

        def on_line(line: str) -> None:
            item = parse_progress(line)
            if isinstance(item, Progress):
                on_progress(item)
            elif isinstance(item, BackupSummary):
                summary.append(item)

        # restic takes its lock before it reads a byte; a retry after a held lock starts where the first began.
        offset = stdin.tell() if stdin is not None and stdin.seekable() else None

        def attempt(argv: list[str]) -> Completed:
            if stdin is not None and offset is not None:
                stdin.seek(offset)
            return stream(argv, on_line, env=self.env(), secrets=self.secrets(), cwd=cwd, stdin=stdin,
                          on_start=on_start)

        self._with_lock_wait(self.backup_argv(paths, tags, host, stdin_filename, options), attempt)
        if not summary or not summary[-1].snapshot_id:
            raise RepositoryError("restic backup ended without reporting a snapshot")
        return summary[-1]

    def snapshots(self, tags: Iterable[str] = (), host: str | None = None, *,
                  any_host: bool = False) -> list[Snapshot]:
        """Snapshots with all these tags, of this host (or of `host`; of every host with any_host)."""
        args = ["snapshots", "--json"]
        tag_list = list(tags)
        if tag_list:
            # One --tag with a comma list means all of them at once.
            args += ["--tag", ",".join(tag_list)]
        if not any_host:
            args += ["--host", host or self.host]
        return parse_snapshots(self._run(*args).stdout)

    def locks(self) -> list[Lock]:
        found = []
        for lock_id in self._run_unlocked("list", "locks", "--no-lock").stdout.split():
            text = run(self.argv("cat", "lock", lock_id, "--no-lock"), env=self.env(), secrets=self.secrets(),
                       check=False, timeout=self._command_limit)
            if text.returncode == 0:  # else its holder removed it in between
                found.append(parse_lock(lock_id, text.stdout))
        return found

    def unlock_stale(self) -> list[Lock]:
        """Remove the locks a killed restic on this host left; another host's lock is never removed."""
        if not self.is_initialized():
            return []
        locks = self.locks()
        dead = removable_locks(locks, self.machine, datetime.now(UTC))
        if dead is None:
            foreign = [lk for lk in locks if lk.hostname != self.machine]
            log.warning("not running restic unlock: it would also remove the lock of %s, which may still be "
                        "working; run `restic unlock` by hand once that host is known to be down",
                        ", ".join(f"PID {lk.pid} on {lk.hostname}" for lk in foreign) or "a live process")
            return []
        if dead:
            log.info("removing stale repository lock(s) of %s on this host",
                     ", ".join(f"PID {lk.pid}" for lk in dead))
            self._run_unlocked("unlock")
        return dead

    def forget(self, ids: Sequence[str]) -> None:
        if ids:
            self._run("forget", *ids)

    def forget_policy_argv(self, tags: Iterable[str], host: str, retention: Retention) -> list[str]:
        # No --prune: prune locks the whole repository, and in a fleet only one host runs it (prune()).
        return self.argv("forget", "--host", host, "--tag", ",".join(tags),
                         # The tag filter already scopes to one VM's disk; grouping by tags would make every run
                         # (each has its own run: tag) a group of one, and nothing would ever be forgotten.
                         "--group-by", "host", *retention.forget_args())

    def prune(self) -> None:
        """Remove the data no snapshot uses any more, whichever host forgot it."""
        self._run("prune")

    def check(self, read_data_subset: str | None = None) -> Completed:
        args = ["check"]
        if read_data_subset:
            args += ["--read-data-subset", read_data_subset]
        return self._run(*args)

    def restore_argv(self, snapshot: str, target: str, includes: Sequence[str] = ()) -> list[str]:
        # --verify re-reads every restored file and checks it against the stored blobs.
        argv = self.argv("restore", snapshot, "--target", target, "--verify")
        for inc in includes:
            argv += ["--include", inc]
        return argv

    def restore(self, snapshot: str, target: str, includes: Sequence[str] = ()) -> None:
        self.run_argv(self.restore_argv(snapshot, target, includes))

    def ls(self, snapshot: str) -> list[Node]:
        out = self._run("ls", "--json", snapshot).stdout
        nodes = []
        for line in out.splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if isinstance(d, dict) and d.get("struct_type") == "node":
                nodes.append(Node(path=str(d.get("path", "")), type=str(d.get("type", "")),
                                  size=int(d.get("size") or 0)))
        return nodes

    def dump(self, snapshot: str, filename: str, sink: Callable[[bytes], None]) -> None:
        """Stream one stored file's bytes (a block-mode image) to sink."""
        self._with_lock_wait(self.argv("dump", snapshot, filename),
                             lambda a: stream_bytes(a, sink, env=self.env(), secrets=self.secrets()))

    def dump_in_order(self, snapshot: str, files: Sequence[str], sink: Callable[[bytes], None],
                      finished: Callable[[str, int], None] = lambda name, size: None) -> None:
        """Stream stored files' bytes to sink one after another: a segmented image's segments, in order.

        Files of one directory come from a single `restic dump` of that directory, a tar stream: one
        repository open (key derivation, index) for the whole image instead of one per segment, which for a
        500 GiB disk's 32,000 segments would be hours. The tar must hold exactly `files`, in that order.
        finished(name, size) follows each file's last bytes."""
        parent = posixpath.dirname(files[0]) if files else ""
        if len(files) < 2 or any(posixpath.dirname(name) != parent for name in files):
            for name in files:
                counted = _Counted(sink)
                self.dump(snapshot, name, counted)
                finished(name, counted.size)
            return
        self._with_lock_wait(
            self.argv("dump", snapshot, parent),
            lambda a: stream_output(
                a, lambda out: _tar_files_in_order(out, files, sink, finished, f"{snapshot} {parent}"),
                env=self.env(), secrets=self.secrets()))
