"""TOML config → frozen dataclasses, validated once with every error reported together."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .model import (
    VM,
    VM_NAME_RE,
    Consistency,
    Disk,
    DiskMode,
    HypervisorKind,
    LvRef,
    Retention,
    SnapshotSize,
)
from .run import mask_url

DEFAULT_CONFIG = "/etc/xenbackup/xenbackup.toml"
T = TypeVar("T")


class ConfigError(Exception):
    """The config is unusable; .errors holds one 'file: key: what is wrong' line per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


# --- value parsers: each returns the value or raises ValueError with what is wrong ---

def p_str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {type(v).__name__}")
    return v


def p_path(v: Any) -> str:
    s = p_str(v)
    if not s.startswith("/"):
        raise ValueError(f"expected an absolute path, got {s!r}")
    if "\0" in s:
        raise ValueError("path contains a NUL byte")
    return s


def p_opt_path(v: Any) -> str | None:
    return None if v == "" else p_path(v)


def p_int(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected an integer, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise ValueError(f"expected {lo}..{hi}, got {v}")
        return v
    return parse


def p_opt_int(v: Any) -> int | None:
    return None if v is None else p_int(0, 1_000_000)(v)


def p_lv(v: Any) -> LvRef:
    return LvRef.parse(p_str(v))


def p_size(v: Any) -> SnapshotSize:
    return SnapshotSize.parse(p_str(v))


def p_str_list(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError("expected a list of strings")
    for item in v:
        if not item or "," in item or any(c.isspace() for c in item):
            raise ValueError(f"bad mount option {item!r}: one option per list item, no spaces or commas")
    return tuple(v)


def p_names(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x and not any(c.isspace() for c in x) for x in v):
        raise ValueError('expected a list of device names such as ["xvdb"]')
    return tuple(v)


def p_enum(enum: type[T]) -> Callable[[Any], T]:
    def parse(v: Any) -> T:
        try:
            return enum(p_str(v))  # type: ignore[call-arg]
        except ValueError:
            choices = ", ".join(repr(e.value) for e in enum)  # type: ignore[attr-defined]
            raise ValueError(f"expected one of {choices}, got {v!r}") from None
    return parse


def p_choice(*choices: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(map(repr, choices))}, got {v!r}")
        return str(v)
    return parse


def p_cmd_list(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ValueError('expected an argv list such as ["/usr/local/bin/page-oncall", "--team", "ops"]')
    return tuple(v)


def p_url(v: Any) -> str:
    s = p_str(v)
    if s and not s.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {mask_url(s)!r}")
    return s


def p_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def p_calendar(v: Any) -> str:
    s = p_str(v).strip()
    if not s or "\n" in s:
        raise ValueError("expected a systemd calendar expression such as \"*-*-* 20:00\"")
    return s


def p_timespan(v: Any) -> str:
    s = p_str(v).strip()
    if not s or not all(c.isalnum() or c in " ." for c in s):
        raise ValueError(f'expected a systemd time span such as "30min", got {v!r}')
    return s


_SPAN_UNITS = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "minute": 60, "minutes": 60,
               "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400}
_SPAN_PART = re.compile(r"\s*(\d+)\s*([a-z]*)\s*")


def p_seconds(hi: int) -> Callable[[Any], int]:
    """Seconds as an integer, or a systemd-style span such as "1h", "30min" or "1h 30min"."""
    def parse(v: Any) -> int:
        if isinstance(v, int) and not isinstance(v, bool):
            total = v
        elif isinstance(v, str) and v.strip():
            total, pos = 0, 0
            while pos < len(v):
                m = _SPAN_PART.match(v, pos)
                if m is None or m.end() == pos or m.group(2) not in {"", *_SPAN_UNITS}:
                    raise ValueError(f'expected seconds or a time span such as "1h" or "30min", got {v!r}')
                total += int(m.group(1)) * _SPAN_UNITS.get(m.group(2), 1)
                pos = m.end()
        else:
            raise ValueError(f'expected seconds or a time span such as "1h" or "30min", got {v!r}')
        if not 0 <= total <= hi:
            raise ValueError(f"expected 0..{hi} seconds, got {total}")
        return total
    return parse


def p_ssh_options(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError('expected a list of ssh options such as ["Port=2222", "ConnectTimeout=30"]')
    for item in v:
        key, sep, value = item.partition("=")
        # restic splits sftp.command on blanks itself, so an option can carry neither blanks nor quotes.
        if not sep or not key.isalnum() or not value or any(c.isspace() or c in "'\"\\" for c in item):
            raise ValueError(f"bad ssh option {item!r}: one Name=value per item, without blanks or quotes")
    return tuple(v)


def p_ssh_path(v: Any) -> str | None:
    if v == "":
        return None
    s = p_path(v)
    if any(c.isspace() or c in "'\"\\" for c in s):
        raise ValueError(f"{s!r}: restic passes this path to ssh unquoted, so it must hold no blanks or quotes")
    return s


@dataclass(frozen=True)
class Opt:
    parse: Callable[[Any], Any]
    default: Any
    help: str


# Every option is declared once, here, with its default and its meaning.
REPOSITORY_OPTS: dict[str, Opt] = {
    "url": Opt(p_str, "/var/lib/xenbackup/repo",
               "restic repository: a local path, sftp:host:/path, rest:https://host/, s3:host/bucket"),
    "password_file": Opt(p_path, "/etc/xenbackup/restic-password",
                         "used when the systemd credential 'restic-password' is absent; generated (0600) "
                         "on first use of a local repository"),
    "environment_file": Opt(p_opt_path, None,
                            "KEY=VALUE lines passed only to restic, e.g. AWS_ACCESS_KEY_ID for S3"),
    "cache_dir": Opt(p_path, "/var/cache/xenbackup/restic", "restic's local cache"),
    "host": Opt(p_str, "", "the host name recorded in restic snapshots; empty means this host's name"),
    "compression": Opt(p_choice("auto", "off", "max"), "auto", "restic --compression"),
    "prune": Opt(p_bool, True, "`xenbackup prune` also runs restic prune, which locks the whole repository; "
                 "in a fleet sharing one repository set it on one host only"),
    "lock_wait": Opt(p_seconds(7 * 86400), 3600,
                     "how long a run waits for another process's repository lock before it fails"),
    "limit_upload": Opt(p_int(0, 10_000_000), 0, "restic --limit-upload in KiB/s; 0 is unlimited"),
    "limit_download": Opt(p_int(0, 10_000_000), 0, "restic --limit-download in KiB/s; 0 is unlimited"),
    "sftp_identity": Opt(p_ssh_path, None, "sftp: repositories: the ssh private key (ssh -i)"),
    "sftp_known_hosts": Opt(p_ssh_path, None,
                            "sftp: repositories: the known_hosts file that pins the server's key; "
                            "an unknown or changed key is refused"),
    "sftp_options": Opt(p_ssh_options, (), 'sftp: repositories: more ssh -o options, e.g. ["Port=2222"]'),
}

DEFAULT_OPTS: dict[str, Opt] = {
    "hypervisor": Opt(p_enum(HypervisorKind), HypervisorKind.XEN, "xen, kvm or none"),
    "snapshot_size": Opt(p_size, SnapshotSize.parse("20%ORIGIN"),
                         'classic snapshot COW size, e.g. "1G" or "20%ORIGIN"'),
    "mount_options": Opt(p_str_list, (), "extra mount options for files-mode snapshots"),
    "overflow_threshold": Opt(p_int(1, 99), 80, "snapshot fill (%) at which it is extended"),
    "extend_step": Opt(p_size, SnapshotSize.parse("10%ORIGIN"), "how much to extend a filling snapshot by"),
    "pool_threshold": Opt(p_int(50, 99), 95, "thin pool data or metadata fill (%) at which the run stops"),
    "consistency": Opt(p_enum(Consistency), Consistency.AUTO,
                       "how a VM's disks are snapshotted at one instant: auto, pause, freeze or none"),
    "max_pause": Opt(p_int(1, 3600), 10, "seconds a guest may stay paused or frozen while its snapshots are made"),
    "schedule": Opt(p_calendar, None, "systemd calendar expression for the VM's timer"),
    "randomized_delay": Opt(p_timespan, None, "RandomizedDelaySec= for the VM's timer"),
    "keep_last": Opt(p_opt_int, None, "retention: keep the last N backups"),
    "keep_daily": Opt(p_opt_int, None, "retention: keep N daily backups"),
    "keep_weekly": Opt(p_opt_int, None, "retention: keep N weekly backups"),
    "keep_monthly": Opt(p_opt_int, None, "retention: keep N monthly backups"),
    "keep_yearly": Opt(p_opt_int, None, "retention: keep N yearly backups"),
}

SETTINGS_OPTS: dict[str, Opt] = {
    "runtime_dir": Opt(p_path, "/run/xenbackup", "per-run state and snapshot mount points"),
    "state_dir": Opt(p_path, "/var/lib/xenbackup/state", "last-run records, kept across reboots"),
    "watch_interval": Opt(p_int(1, 3600), 5, "seconds between snapshot fill checks during a backup"),
    "lvremove_retries": Opt(p_int(0, 100), 6, "retries of lvremove while the device is still in use"),
    "progress_interval": Opt(p_int(1, 3600), 30, "seconds between progress lines in the journal"),
    "max_parallel": Opt(p_int(1, 64), 1, "how many VMs may hold snapshots at once"),
    "shutdown_timeout": Opt(p_int(1, 86400), 300, "seconds a VM gets to shut down before a restore destroys it"),
    "metrics_file": Opt(p_opt_path, "/var/lib/prometheus/node-exporter/xenbackup.prom",
                        "Prometheus textfile written after each run; \"\" turns it off"),
    "max_age_hours": Opt(p_int(1, 100000), 48, "`xenbackup status` fails when a VM's last good backup is older"),
    "verify_read_data_subset": Opt(p_str, "5%", "restic check --read-data-subset for `xenbackup verify`"),
    "verify_restore_test": Opt(p_bool, True, "`xenbackup verify` also test-restores every VM's latest backup"),
    "thin_incremental": Opt(p_bool, False,
                            "block-mode disks on thin LVs: keep the last snapshot as a base and let restic read "
                            "only the 16 MiB segments thin_delta reports changed"),
    "dmeventd_monitoring": Opt(p_bool, False,
                               "register classic snapshots with dmeventd (lvcreate --monitor y), e.g. for "
                               "lvm.conf's snapshot_autoextend; xenbackup's own guard watches and extends them"),
}

NOTIFY_OPTS: dict[str, Opt] = {
    "command": Opt(p_cmd_list, (), "argv run on failure; the JSON message arrives on stdin"),
    "mail_to": Opt(p_str, "", "mail the failure through the local sendmail to this address"),
    "webhook": Opt(p_url, "", "POST the failure as JSON to this http(s) URL"),
    "sendmail": Opt(p_str, "/usr/sbin/sendmail", "the sendmail binary"),
    "timeout": Opt(p_int(1, 600), 30, "seconds each notifier may take"),
}

COMMAND_NAMES = ("lvs", "vgs", "lvcreate", "lvremove", "lvextend", "mount", "umount",
                 "blkid", "dumpe2fs", "restic", "xl", "virsh", "losetup", "udevadm", "fallocate", "systemd-analyze",
                 "journalctl", "lvchange", "dmsetup", "thin_delta", "systemctl")
COMMAND_OPTS: dict[str, Opt] = {name: Opt(p_str, name, f"the {name} binary") for name in COMMAND_NAMES}

VM_ONLY_OPTS: dict[str, Opt] = {
    "domain_config": Opt(p_path, None, "the domain config saved with each backup; xen: /etc/xen/<vm>.cfg"),
    "disks": Opt(lambda v: v, None, "the LVs to snapshot: [{ lv = \"VG/LV\", mode = \"files\", path = \"vm1\" }]; "
                 "without it they are read from the domain's definition"),
    "exclude": Opt(p_names, (), "discovered disks to skip, by the guest's device name: [\"xvdb\"]"),
}
DISK_OPTS: dict[str, Opt] = {
    "lv": Opt(p_lv, None, '"VG/LV" of the logical volume'),
    "mode": Opt(p_enum(DiskMode), DiskMode.FILES,
                "files: mount the snapshot and back up a path; block: back up the device's bytes"),
    "path": Opt(p_str, ".", "files mode: the directory inside the filesystem to back up"),
    "mount_options": Opt(p_str_list, (), "extra mount options for this disk"),
}


@dataclass(frozen=True)
class RepositoryConfig:
    url: str
    password_file: str
    environment_file: str | None
    cache_dir: str
    host: str
    compression: str
    prune: bool = True
    lock_wait: int = 3600
    limit_upload: int = 0
    limit_download: int = 0
    sftp_identity: str | None = None
    sftp_known_hosts: str | None = None
    sftp_options: tuple[str, ...] = ()

    @property
    def hostname(self) -> str:
        """The host name restic records in snapshots and filters them by."""
        # The kernel's host name, as gethostname(2) returns it; without the socket module's import cost.
        return self.host or os.uname().nodename

    @property
    def display_url(self) -> str:
        """The URL for messages: its password (rest:https://user:pw@host/) and query are masked."""
        return mask_url(self.url)

    @property
    def is_local(self) -> bool:
        return not any(self.url.startswith(p) for p in ("sftp:", "rest:", "s3:", "b2:", "azure:", "gs:",
                                                         "swift:", "rclone:"))


@dataclass(frozen=True)
class Settings:
    """See SETTINGS_OPTS for each field's default and meaning."""

    runtime_dir: str
    state_dir: str
    watch_interval: int
    lvremove_retries: int
    progress_interval: int
    max_parallel: int
    shutdown_timeout: int
    metrics_file: str | None
    max_age_hours: int
    verify_read_data_subset: str
    verify_restore_test: bool
    thin_incremental: bool = False
    dmeventd_monitoring: bool = False


@dataclass(frozen=True)
class NotifyConfig:
    """See NOTIFY_OPTS."""

    command: tuple[str, ...]
    mail_to: str
    webhook: str
    sendmail: str
    timeout: int


@dataclass(frozen=True)
class Config:
    path: str
    repository: RepositoryConfig
    settings: Settings
    commands: Mapping[str, str]
    vms: Mapping[str, VM]
    notify: NotifyConfig
    default_retention: Retention = field(default_factory=Retention)

    def vm(self, name: str) -> VM:
        try:
            return self.vms[name]
        except KeyError:
            known = ", ".join(sorted(self.vms)) or "none"
            raise ConfigError([f"{self.path}: vm.{name}: no such VM in the config (configured: {known})"]
                              ) from None

    def command(self, name: str) -> str:
        return self.commands[name]


class _Collector:
    def __init__(self, path: str) -> None:
        self.path = path
        self.errors: list[str] = []
        # (key, value) of every calendar expression and time span, for systemd to judge in one go.
        self.calendars: list[tuple[str, str]] = []
        self.timespans: list[tuple[str, str]] = []

    def error(self, key: str, what: str) -> None:
        self.errors.append(f"{self.path}: {key}: {what}")

    def section(self, raw: Any, key: str) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.error(key, f"expected a table, got {type(raw).__name__}")
            return {}
        return raw

    def options(self, raw: Mapping[str, Any], opts: Mapping[str, Opt], prefix: str,
                inherited: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Parse the declared options of one table; unknown keys are errors."""
        out: dict[str, Any] = {}
        for key in raw:
            if key not in opts:
                self.error(f"{prefix}{key}", f"unknown key (known: {', '.join(sorted(opts))})")
        for key, opt in opts.items():
            if key in raw:
                try:
                    out[key] = opt.parse(raw[key])
                except ValueError as exc:
                    self.error(f"{prefix}{key}", str(exc))
                    continue
                if opt.parse is p_calendar:
                    self.calendars.append((f"{prefix}{key}", out[key]))
                elif opt.parse is p_timespan:
                    self.timespans.append((f"{prefix}{key}", out[key]))
            elif inherited is not None and key in inherited:
                out[key] = inherited[key]
            else:
                out[key] = opt.default
        return out


def load(path: str | None = None, ask_systemd: bool = False) -> Config:
    """Read and validate the config file; raises ConfigError listing every problem.

    With ask_systemd, systemd-analyze also judges every calendar expression and time span, and its
    complaints join the same list.
    """
    from . import tomlcache

    where = path or os.environ.get("XENBACKUP_CONFIG") or DEFAULT_CONFIG
    try:
        raw = tomlcache.load(where, lambda data: _toml(data, where))
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read: {exc.strerror}"]) from None
    return _validated(raw, where, ask_systemd)


def parse(data: bytes | str, path: str = "<config>", ask_systemd: bool = False) -> Config:
    return _validated(_toml(data, path), path, ask_systemd)


def _toml(data: bytes | str, path: str) -> dict[str, Any]:
    # Imported here: a unit's later steps take the parsed file from tomlcache and never need it.
    if sys.version_info >= (3, 11):  # noqa: UP036 - tomli keeps older Pythons working
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: (file): not UTF-8: {exc.reason} at byte {exc.start}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: (syntax): {exc}"]) from None


def _validated(raw: dict[str, Any], path: str, ask_systemd: bool) -> Config:
    c = _Collector(path)
    known = {"repository", "defaults", "settings", "commands", "notify", "vm"}
    for key in raw:
        if key not in known:
            c.error(key, f"unknown section (known: {', '.join(sorted(known))})")

    repo = c.options(c.section(raw.get("repository"), "repository"), REPOSITORY_OPTS, "repository.")
    if not repo.get("url"):
        c.error("repository.url", "must not be empty")
    for key in ("sftp_identity", "sftp_known_hosts", "sftp_options"):
        if repo.get(key) and not str(repo.get("url", "")).startswith("sftp:"):
            c.error(f"repository.{key}", "applies to sftp: repositories only")
    defaults = c.options(c.section(raw.get("defaults"), "defaults"), DEFAULT_OPTS, "defaults.")
    settings = c.options(c.section(raw.get("settings"), "settings"), SETTINGS_OPTS, "settings.")
    commands = c.options(c.section(raw.get("commands"), "commands"), COMMAND_OPTS, "commands.")
    notify = c.options(c.section(raw.get("notify"), "notify"), NOTIFY_OPTS, "notify.")

    vms: dict[str, VM] = {}
    for name, vm_raw in c.section(raw.get("vm"), "vm").items():
        vm = _parse_vm(c, name, vm_raw, defaults)
        if vm is not None:
            vms[name] = vm
    _cross_checks(c, vms)
    if ask_systemd:
        _systemd_checks(c, str(commands.get("systemd-analyze") or "systemd-analyze"))

    if c.errors:
        raise ConfigError(c.errors)
    return Config(
        path=path,
        repository=RepositoryConfig(**repo),
        settings=Settings(**settings),
        commands=commands,
        vms=vms,
        notify=NotifyConfig(**notify),
        default_retention=_retention(defaults),
    )


KEEP_KEYS = ("keep_last", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")


def _retention(values: Mapping[str, Any]) -> Retention:
    """A VM that sets any keep_* has its own policy; otherwise the [defaults] policy applies whole."""
    return Retention(**{k: values[k] for k in KEEP_KEYS})


def _parse_vm(c: _Collector, name: str, raw: Any, defaults: Mapping[str, Any]) -> VM | None:
    prefix = f"vm.{name}."
    if not VM_NAME_RE.match(name):
        c.error(f"vm.{name}", "VM names are 1-63 characters of letters, digits, '_', '.', '+', '-'")
    table = c.section(raw, f"vm.{name}")
    opts = {**DEFAULT_OPTS, **VM_ONLY_OPTS}
    values = c.options(table, opts, prefix, inherited=defaults)
    disks = _parse_disks(c, table.get("disks"), prefix, values.get("mount_options", ()))
    hypervisor = values.get("hypervisor", HypervisorKind.XEN)
    domain_config = values.get("domain_config")
    if domain_config is None and hypervisor is HypervisorKind.XEN:
        domain_config = f"/etc/xen/{name}.cfg"
    if not isinstance(hypervisor, HypervisorKind):
        return None
    try:
        return VM(
            name=name,
            disks=disks,
            hypervisor=hypervisor,
            domain_config=domain_config,
            snapshot_size=values["snapshot_size"],
            schedule=values["schedule"],
            randomized_delay=values["randomized_delay"],
            retention=_retention(values if not any(k in table for k in KEEP_KEYS)
                                 else {k: values[k] if k in table else None for k in KEEP_KEYS}),
            overflow_threshold=values["overflow_threshold"],
            extend_step=values["extend_step"],
            pool_threshold=values["pool_threshold"],
            consistency=values["consistency"],
            max_pause=values["max_pause"],
            exclude=values["exclude"],
            mount_options=values["mount_options"],
        )
    except (KeyError, TypeError):
        return None  # an error for the missing key was already collected


def _parse_disks(c: _Collector, raw: Any, prefix: str, vm_mount_options: tuple[str, ...]) -> tuple[Disk, ...]:
    if raw is None:
        return ()  # discovered from the domain's definition at run time
    if not isinstance(raw, list) or not raw:
        c.error(f"{prefix}disks", "expected a non-empty list of tables")
        return ()
    disks: list[Disk] = []
    at: list[int] = []  # each disk's index in the file, which skipped entries make differ from its own
    for i, item in enumerate(raw):
        key = f"{prefix}disks[{i}]"
        table = c.section(item, key)
        if not table:
            if isinstance(item, dict):
                c.error(f"{key}.lv", "missing")
            continue
        values = c.options(table, DISK_OPTS, f"{key}.")
        if "lv" not in table:
            c.error(f"{key}.lv", 'missing: the logical volume as "VG/LV"')
            continue
        path = values.get("path", ".")
        if isinstance(path, str):
            norm = os.path.normpath(path)
            if path.startswith("/") or norm == ".." or norm.startswith("../") or "\0" in path:
                c.error(f"{key}.path", f"must be a relative path inside the filesystem, got {path!r}")
                continue
            path = norm
        if values.get("mode") is DiskMode.BLOCK and "path" in table:
            c.error(f"{key}.path", "block mode backs up the whole device; path applies to files mode only")
        if any(k not in values for k in ("lv", "mode")):
            continue
        disks.append(Disk(lv=values["lv"], mode=values["mode"], path=path,
                          mount_options=vm_mount_options + tuple(values.get("mount_options", ()))))
        at.append(i)
    seen: set[str] = set()
    for i, d in zip(at, disks, strict=True):
        if str(d.lv) in seen:
            c.error(f"{prefix}disks[{i}].lv", f"{d.lv} is listed twice")
        seen.add(str(d.lv))
    return tuple(disks)


def _cross_checks(c: _Collector, vms: Mapping[str, VM]) -> None:
    """Checks that need more than one option at a time live here, in one place."""
    owner: dict[str, str] = {}
    for vm in vms.values():
        for i, disk in enumerate(vm.disks):
            other = owner.get(str(disk.lv))
            if other is not None and other != vm.name:
                c.error(f"vm.{vm.name}.disks[{i}].lv", f"{disk.lv} already belongs to vm.{other}")
            owner[str(disk.lv)] = vm.name
        prefix = f"vm.{vm.name}."
        if vm.hypervisor is HypervisorKind.NONE:
            if vm.discovers_disks:
                c.error(f"{prefix}disks", 'missing: hypervisor = "none" has no domain definition to find the disks '
                        'in; list them, e.g. disks = [{ lv = "system/xenvm" }]')
            if vm.consistency in (Consistency.PAUSE, Consistency.FREEZE):
                c.error(f"{prefix}consistency", f'hypervisor = "none" cannot {vm.consistency.value} a guest')
        if vm.consistency is Consistency.FREEZE and vm.hypervisor is HypervisorKind.XEN:
            c.error(f"{prefix}consistency", 'freeze needs the qemu guest agent (hypervisor = "kvm"); '
                    'Xen guests use "pause"')
        if vm.exclude and not vm.discovers_disks:
            c.error(f"{prefix}exclude", "applies to discovered disks only; drop it or the disks key")


def _systemd_checks(c: _Collector, analyze: str) -> None:
    """systemd's own verdict on the calendar expressions and time spans, added to the same error list."""
    from .run import CommandError
    from .systemd import calendar_errors, timespan_errors

    for judge, values, what in ((calendar_errors, c.calendars, "calendar expression"),
                                (timespan_errors, c.timespans, "time span")):
        if not values:
            continue
        try:
            bad = judge([v for _, v in values], analyze)
        except CommandError as exc:
            c.error("commands.systemd-analyze", f"cannot check the {what}s: {exc}")
            continue
        for key, value in values:
            if value in bad:
                c.error(key, f"invalid {what} {value!r}: {bad[value]}")
