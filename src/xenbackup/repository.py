"""restic adapter: init, backup, snapshots, forget, check, restore, dump."""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from .config import RepositoryConfig
from .model import Retention
from .run import Completed, mask_url, run, stream, stream_bytes, url_secrets

log = logging.getLogger(__name__)

CREDENTIAL = "restic-password"


class RepositoryError(Exception):
    pass


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
    env: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep or not key.strip().isidentifier():
                raise RepositoryError(f"{path}:{number}: expected KEY=VALUE")
            env[key.strip()] = value.strip().strip('"')
    return env


class Restic:
    def __init__(self, cfg: RepositoryConfig, restic: str = "restic",
                 credentials_dir: str | None = None) -> None:
        self.cfg = cfg
        self.bin = restic
        self.credentials_dir = credentials_dir if credentials_dir is not None else os.environ.get(
            "CREDENTIALS_DIRECTORY")
        self._extra_env: dict[str, str] | None = None

    # --- secrets ---

    def password_file(self) -> str:
        """The systemd credential if the unit passed one, else the configured 0600 file."""
        if self.credentials_dir:
            cred = os.path.join(self.credentials_dir, CREDENTIAL)
            if os.path.exists(cred):
                return cred
        return self.cfg.password_file

    def ensure_password(self) -> str:
        path = self.password_file()
        if os.path.exists(path):
            return path
        if not self.cfg.is_local:
            raise RepositoryError(f"password file {path} is missing; a remote repository needs its password")
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        log.warning("generated a new repository password in %s: keep a copy off this host, "
                    "without it the backups cannot be read", path)
        return path

    def env(self) -> dict[str, str]:
        if self._extra_env is None:
            self._extra_env = (read_environment_file(self.cfg.environment_file)
                               if self.cfg.environment_file else {})
        return {
            **self._extra_env,
            "RESTIC_REPOSITORY": self.cfg.url,
            "RESTIC_PASSWORD_FILE": self.password_file(),
            "RESTIC_CACHE_DIR": self.cfg.cache_dir,
            "RESTIC_PROGRESS_FPS": "1",
        }

    def secrets(self) -> list[str]:
        self.env()
        return [v for k, v in (self._extra_env or {}).items() if "KEY" in k or "SECRET" in k or "PASS" in k
                or "TOKEN" in k] + url_secrets(self.cfg.url)

    def _run(self, args: Sequence[str], **kw: Any) -> Completed:
        return run([self.bin, *args], env=self.env(), secrets=self.secrets(), **kw)

    def run_argv(self, argv: Sequence[str]) -> Completed:
        """Run an argv built by one of the *_argv methods."""
        return run(argv, env=self.env(), secrets=self.secrets())

    # --- repository ---

    def is_initialized(self) -> bool:
        return self._open_error() is None

    def _open_error(self) -> str | None:
        """None when the repository opens, else why not (restic's first line)."""
        if self.cfg.is_local:
            return None if os.path.exists(os.path.join(self.cfg.url, "config")) else "no repository there"
        probe = self._run(["cat", "config"], check=False)
        if probe.returncode == 0:
            return None
        return next((line.strip() for line in probe.stderr.splitlines() if line.strip()), "no answer")

    def ensure_initialized(self) -> None:
        """On first use, create the local repository (and its password)."""
        self.ensure_password()
        error = self._open_error()
        if error is None:
            if self.cfg.is_local:
                self._check_key()
            return
        if not self.cfg.is_local:
            raise RepositoryError(f"repository {mask_url(self.cfg.url)} cannot be opened: {error} (if it was never "
                                  "initialised, run `xenbackup init` once)")
        self.init()

    def _check_key(self) -> None:
        """Decrypt the repository's config as any backup would: a wrong password fails here, before LVM."""
        probe = self._run(["cat", "config"], check=False)
        if probe.returncode != 0:
            why = next((line.strip() for line in probe.stderr.splitlines() if line.strip()), "no answer")
            raise RepositoryError(f"repository {mask_url(self.cfg.url)} cannot be opened: {why}")

    def init(self) -> None:
        self.ensure_password()
        log.info("initialising restic repository %s", mask_url(self.cfg.url))
        self._run(["init"])

    def backup_argv(self, paths: Sequence[str], tags: Iterable[str], host: str,
                    stdin_filename: str | None = None) -> list[str]:
        argv = [self.bin, "backup", "--json", "--host", host, "--compression", self.cfg.compression]
        for tag in tags:
            argv += ["--tag", tag]
        if stdin_filename is not None:
            return [*argv, "--stdin", "--stdin-filename", stdin_filename]
        return [*argv, "--one-file-system", "--", *paths]

    def backup(self, paths: Sequence[str], tags: Iterable[str], host: str,
               on_progress: Callable[[Progress], None], cwd: str | None = None,
               stdin: IO[bytes] | None = None, stdin_filename: str | None = None,
               on_start: Callable[[subprocess.Popen[bytes]], None] | None = None) -> BackupSummary:
        summary: list[BackupSummary] = []

        def on_line(line: str) -> None:
            item = parse_progress(line)
            if isinstance(item, Progress):
                on_progress(item)
            elif isinstance(item, BackupSummary):
                summary.append(item)

        argv = self.backup_argv(paths, tags, host, stdin_filename)
        stream(argv, on_line, env=self.env(), secrets=self.secrets(), cwd=cwd, stdin=stdin, on_start=on_start)
        if not summary or not summary[-1].snapshot_id:
            raise RepositoryError("restic backup ended without reporting a snapshot")
        return summary[-1]

    def snapshots(self, tags: Iterable[str] = (), host: str | None = None) -> list[Snapshot]:
        args = ["snapshots", "--json"]
        tag_list = list(tags)
        if tag_list:
            # One --tag with a comma list means all of them at once.
            args += ["--tag", ",".join(tag_list)]
        if host:
            args += ["--host", host]
        return parse_snapshots(self._run(args).stdout)

    def unlock_stale(self) -> None:
        """Remove locks left by a restic that was killed (restic only removes locks of dead processes)."""
        if self.is_initialized():
            self._run(["unlock"], check=False)

    def forget(self, ids: Sequence[str]) -> None:
        if ids:
            self._run(["forget", *ids])

    def forget_policy_argv(self, tags: Iterable[str], host: str, retention: Retention) -> list[str]:
        return [self.bin, "forget", "--prune", "--host", host, "--tag", ",".join(tags),
                # The tag filter already scopes to one VM's disk; grouping by tags would make every run
                # (each has its own run: tag) a group of one, and nothing would ever be forgotten.
                "--group-by", "host", *retention.forget_args()]

    def check(self, read_data_subset: str | None = None) -> Completed:
        args = ["check"]
        if read_data_subset:
            args += ["--read-data-subset", read_data_subset]
        return self._run(args)

    def restore_argv(self, snapshot: str, target: str, includes: Sequence[str] = ()) -> list[str]:
        # --verify re-reads every restored file and checks it against the stored blobs.
        argv = [self.bin, "restore", snapshot, "--target", target, "--verify"]
        for inc in includes:
            argv += ["--include", inc]
        return argv

    def restore(self, snapshot: str, target: str, includes: Sequence[str] = ()) -> None:
        self._run(self.restore_argv(snapshot, target, includes)[1:])

    def ls(self, snapshot: str) -> list[Node]:
        out = self._run(["ls", "--json", snapshot]).stdout
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
        stream_bytes([self.bin, "dump", snapshot, filename], sink, env=self.env(), secrets=self.secrets())
