"""The xenbackup command: verbs → actions, and the one place that maps errors to exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING

# Each verb imports its own action modules: a unit runs three steps, each a fresh interpreter, and
# the step that makes snapshots has no use for restore, prune or status code.
from . import config as config_mod
from . import journal, names
from .config import Config, ConfigError
from .run import CommandError, mask_url
from .state import Busy

if TYPE_CHECKING:
    from .actions.context import Context

log = logging.getLogger("xenbackup")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUSY = 3
EXIT_OVERFLOW = 4
EXIT_INTERRUPTED = 130


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: raised so that every finally-block and context manager cleans up."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signal.Signals(signum).name)


def _context(cfg: Config) -> Context:
    from .actions.context import Context

    return Context.from_config(cfg)


def _vm_name(text: str) -> str:
    # The units pass %i; accept systemd-escape'd instance names as well as plain ones.
    return names.unescape_instance(text)


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size gives it, without importing shutil."""
    try:
        if (columns := int(os.environ["COLUMNS"])) > 0:
            return columns
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 80
    except (OSError, ValueError):
        return 80


class _Formatter(argparse.HelpFormatter):
    """argparse's own, told the width: by default it imports shutil to ask, and with it the bz2 and lzma
    modules, in every step (argparse builds a formatter for each argument it is given)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_columns() - 2)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line; with `only`, just that verb's parser: a unit step pays for each one it builds."""
    p = argparse.ArgumentParser(prog="xenbackup", description="Live backups of Xen/KVM VMs on LVM with restic.",
                                formatter_class=_Formatter)
    p.add_argument("--config", help="config file (default: $XENBACKUP_CONFIG or "
                                     f"{config_mod.DEFAULT_CONFIG})")
    p.add_argument("--debug", action="store_true", help="log every command and show tracebacks")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help: str) -> argparse.ArgumentParser | None:
        return sub.add_parser(name, help=help, formatter_class=_Formatter) if only in (None, name) else None

    if b := verb("backup", "back up a VM now, in the foreground (same steps as the unit)"):
        b.add_argument("vm", type=_vm_name)

    if s := verb("step", "one step of xenbackup@.service (used by the unit)"):
        # prepare = snapshot + mount in one process, the unit's ExecStartPre=; the two halves stay for drop-ins.
        s.add_argument("step", choices=["prepare", "snapshot", "mount", "backup", "cleanup"])
        s.add_argument("vm", type=_vm_name)

    if ls := verb("list", "list backups with time, size and mode"):
        ls.add_argument("vm", nargs="?", type=_vm_name)
        ls.add_argument("--json", action="store_true")
        hosts = ls.add_mutually_exclusive_group()
        hosts.add_argument("--host", action="append", metavar="NAME",
                           help="list host NAME's backups instead of this host's (repeatable)")
        hosts.add_argument("--all-hosts", action="store_true", help="list the backups of every host")

    if pl := verb("plan", "dry run: print every command a backup would run, change nothing"):
        pl.add_argument("vm", type=_vm_name)

    if r := verb("restore", "restore a VM: stop it, restore over the original, verify, start it"):
        r.add_argument("vm", type=_vm_name)
        r.add_argument("--snapshot", default="latest", help="run ID or restic snapshot ID (default: latest)")
        r.add_argument("--host", metavar="NAME", help="restore a backup another host made (disaster recovery)")
        where = r.add_mutually_exclusive_group()
        where.add_argument("--in-place", action="store_true", help="restore over the VM's own files or LV (default)")
        where.add_argument("--to", dest="to_path", metavar="PATH", help="restore a files-mode disk into PATH instead")
        where.add_argument("--to-lv", metavar="VG/LV", help="write a block-mode image to another LV")
        r.add_argument("--disk", metavar="VG/LV", help="restore only this disk of the VM")
        r.add_argument("--flatten", action="store_true", help="put every file straight into the target directory")
        r.add_argument("--include", nargs="+", default=[], metavar="PATH", help="restore only these paths")
        r.add_argument("--stop", action="store_true", help="shut the VM down first if it is running")
        r.add_argument("--no-start", action="store_true", help="leave the VM stopped afterwards")
        r.add_argument("--with-config", action="store_true", help="also restore the saved domain config")
        r.add_argument("--delete", action="store_true", help="delete files in the target that are not in the backup")
        r.add_argument("--dry-run", action="store_true", help="print every step, change nothing")

    if pr := verb("prune", "apply the retention policy: restic forget per VM, then restic prune where "
                           "[repository] prune = true"):
        pr.add_argument("vm", nargs="?", type=_vm_name)

    if ve := verb("verify", "restic check, plus a test restore of each VM's latest backup"):
        ve.add_argument("--read-data-subset", metavar="N%|n/t", help="how much pack data restic check reads")
        ve.add_argument("--restore-test", nargs="*", metavar="VM", type=_vm_name,
                        help="test-restore these VMs (no names: every VM)")
        ve.add_argument("--no-check", action="store_true", help="skip restic check")

    if st := verb("status", "one row per VM: last result, size, peak fill, next run"):
        st.add_argument("--json", action="store_true")

    if no := verb("notify", "send the failure alert for a unit (used by xenbackup-notify@.service)"):
        no.add_argument("unit")

    verb("sweep", "remove snapshots and mounts left by interrupted runs (runs at boot)")
    if cc := verb("check-config", "validate the config and report every problem, including VGs, LVs and "
                                  "domain configs missing on this host"):
        cc.add_argument("--offline", action="store_true",
                        help="check the file only, not this host (for a config written for another host)")
    verb("reload", "after a config change: reload systemd and start or stop the VMs' timers to match each "
                   "`schedule` (no reboot needed)")
    verb("init", "initialise the restic repository (local ones are created on first use)")
    return p


def named_verb(argv: Sequence[str]) -> str | None:
    """The verb on this command line when it is surely one, else None (and every parser is built).

    A word is the verb when no option before it takes it as a value: of the global options only --config
    (or a prefix of it, which argparse accepts) takes one, unless given as --config=FILE. A help option
    before the verb asks for the list of every verb.
    """
    words = iter(argv)
    for word in words:
        if word == "--":
            word = next(words, "")
        elif word.startswith("-"):
            if word == "-h" or (len(word) > 2 and "--help".startswith(word)):
                return None
            if len(word) > 2 and "--config".startswith(word):
                next(words, None)
            continue
        return word if word in VERBS else None
    return None


def _cmd_backup(cfg: Config, args: argparse.Namespace) -> int:
    from .actions import backup as backup_mod

    vm = cfg.vm(args.vm)
    ctx = _context(cfg)
    with journal.context(vm=vm.name):
        backup_mod.backup_foreground(ctx, vm)
    return EXIT_OK


def _cmd_step(cfg: Config, args: argparse.Namespace) -> int:
    from .actions import backup as backup_mod

    vm = cfg.vm(args.vm)
    ctx = _context(cfg)
    with journal.context(vm=vm.name):
        if args.step == "cleanup":
            return backup_mod.step_cleanup(ctx, vm)
        steps = {"prepare": backup_mod.step_prepare, "snapshot": backup_mod.step_snapshot,
                 "mount": backup_mod.step_mount}
        try:
            if args.step == "backup":
                backup_mod.step_backup(ctx, vm, finish=True)
            else:
                steps[args.step](ctx, vm)
        except BaseException as exc:
            backup_mod.note_failure(ctx, vm, exc)
            raise
    return EXIT_OK


def _cmd_list(cfg: Config, args: argparse.Namespace) -> int:
    import json

    from .actions.listing import group_runs, render_table

    ctx = _context(cfg)
    hosts = list(dict.fromkeys(args.host or [ctx.host]))
    if args.vm and not args.all_hosts and hosts == [ctx.host]:
        cfg.vm(args.vm)  # another host's VMs need not be in this host's config
    tags = names.restic_filter(args.vm)
    snaps = []
    if ctx.restic.is_initialized():
        if args.all_hosts:
            snaps = ctx.restic.snapshots(tags, any_host=True)
        else:
            for host in hosts:
                snaps += ctx.restic.snapshots(tags, host=host)
    records: dict[str, dict[str, object]] = {}
    for name in cfg.vms:
        for rec in ctx.store.run_records(name):
            records[str(rec.get("run_id"))] = rec
    rows = group_runs(snaps, records)
    if args.json:
        print(json.dumps([r.as_json() for r in rows], indent=1))
        return EXIT_OK
    print(render_table(rows, with_host=args.all_hosts or hosts != [ctx.host]))
    return EXIT_OK


def _cmd_plan(cfg: Config, args: argparse.Namespace) -> int:
    from .actions import plan as plan_mod

    vm = cfg.vm(args.vm)
    ctx = _context(cfg)
    print(f"# dry run for {vm.name}: nothing is executed")
    for cmd in plan_mod.plan(ctx, vm):
        note = f"    # {cmd.note}" if cmd.note else ""
        print(f"[{cmd.phase}] {shlex.join(cmd.argv)}{note}")
    return EXIT_OK


def _cmd_restore(cfg: Config, args: argparse.Namespace) -> int:
    from .actions.context import RestoreError
    from .actions.restore import Restorer, RestoreRequest
    from .model import LvRef

    vm = cfg.vm(args.vm)
    try:
        to_lv = LvRef.parse(args.to_lv) if args.to_lv else None
    except ValueError as exc:
        raise RestoreError(f"--to-lv: {exc}") from None
    req = RestoreRequest(vm=vm.name, snapshot=args.snapshot, to_path=args.to_path, to_lv=to_lv, disk=args.disk,
                         flatten=args.flatten, includes=tuple(args.include), stop=args.stop,
                         start=not args.no_start, with_config=args.with_config, delete=args.delete,
                         dry_run=args.dry_run, shutdown_timeout=cfg.settings.shutdown_timeout, host=args.host)
    ctx = _context(cfg)
    with journal.context(vm=vm.name, phase="restore"):
        if args.dry_run:
            print(f"# dry run: restore of {vm.name}; nothing is changed")
        outcome = Restorer(ctx, vm, req, say=print).run()
    if not args.dry_run:
        print(f"restored {vm.name}: {', '.join(outcome.restored)}")
    return EXIT_OK


def _cmd_sweep(cfg: Config, args: argparse.Namespace) -> int:
    from .actions.sweep import sweep_all

    removed = sweep_all(_context(cfg))
    log.info("sweep done: %s", f"removed {', '.join(removed)}" if removed else "nothing left behind")
    return EXIT_OK


def _cmd_check_config(cfg: Config, args: argparse.Namespace) -> int:
    from .actions.hostcheck import host_problems
    from .lvm import Lvm, LvmError

    if args.offline:
        print(f"{cfg.path}: OK (file only, host not checked), {len(cfg.vms)} VM(s): "
              f"{', '.join(sorted(cfg.vms)) or 'none'}")
        return EXIT_OK
    lines, problems = _discovered_disks(cfg)
    try:
        problems += host_problems(cfg, Lvm(cfg.commands))
    except (CommandError, LvmError) as exc:
        problems.append(f"{cfg.path}: cannot check this host's LVs: {exc}; "
                        "use --offline for a config written for another host")
    if problems:
        raise ConfigError(problems)
    print(f"{cfg.path}: OK, {len(cfg.vms)} VM(s): {', '.join(sorted(cfg.vms)) or 'none'}")
    for line in lines:
        print(line)
    return EXIT_OK


def _discovered_disks(cfg: Config) -> tuple[list[str], list[str]]:
    """Each VM's disks and where they came from; a disk two VMs claim, or a definition that fails, is an error."""
    from .actions.context import StepError
    from .model import DiskMode

    ctx = _context(cfg)
    lines: list[str] = []
    errors: list[str] = []
    owner: dict[str, str] = {}
    for vm in cfg.vms.values():
        try:
            disks = ctx.disks(vm)
        except StepError as exc:
            errors.append(f"{cfg.path}: vm.{vm.name}.disks: {exc} (a run would fail before any snapshot)")
            continue
        for disk in disks:
            where = "configured" if disk.source == "config" else f"found: {disk.source}"
            lines.append(f"  {vm.name}: {disk.lv} {disk.mode.value}"
                         f"{'' if disk.mode is DiskMode.BLOCK else ' ' + disk.path} ({where})")
            other = owner.setdefault(str(disk.lv), vm.name)
            if other != vm.name:
                errors.append(f"{cfg.path}: vm.{vm.name}.disks: {disk.lv} is a disk of vm.{other} too")
    return lines, errors


def _cmd_prune(cfg: Config, args: argparse.Namespace) -> int:
    from .actions import ops

    ctx = _context(cfg)
    names = [cfg.vm(args.vm).name] if args.vm else sorted(cfg.vms)
    for name in names:
        with ctx.store.lock(name):
            ops.prune(ctx, cfg.vm(name))
    ops.prune_repository(ctx)
    return EXIT_OK


def _cmd_verify(cfg: Config, args: argparse.Namespace) -> int:
    from .actions import ops
    from .actions.context import RestoreError
    from .model import format_bytes

    ctx = _context(cfg)
    if not args.no_check:
        ops.check_repository(ctx, args.read_data_subset or cfg.settings.verify_read_data_subset)
    if args.restore_test is None:
        names = sorted(cfg.vms) if cfg.settings.verify_restore_test else []
    else:
        names = args.restore_test or sorted(cfg.vms)
    failed = []
    for name in names:
        try:
            res = ops.restore_test(ctx, cfg.vm(name))
            print(f"{name}: restore test of run {res.run_id} passed ({res.entries} files, "
                  f"{format_bytes(res.bytes)})")
        except (ops.VerifyFailed, RestoreError, CommandError) as exc:
            log.error("restore test of %s failed: %s", name, exc)
            failed.append(name)
    return EXIT_FAILED if failed else EXIT_OK


def _cmd_status(cfg: Config, args: argparse.Namespace) -> int:
    import json

    from . import systemd
    from .actions import status as status_mod

    units, timers = systemd.overview([names.service(n) for n in cfg.vms], cfg.command("systemctl"))
    rows = status_mod.collect(cfg, units, timers)
    if args.json:
        # A VM per line: json's C encoder writes a line at a time, and indenting would need its pure-Python one.
        print("[\n" + ",\n".join(json.dumps(r.as_json()) for r in rows) + "\n]")
    else:
        print(status_mod.render_table(rows))
    return EXIT_OK if all(r.ok for r in rows) else EXIT_FAILED


def _cmd_notify(cfg: Config, args: argparse.Namespace) -> int:
    from .actions import notify as notify_mod

    msg = notify_mod.build_message(cfg, args.unit)
    with journal.context(vm=msg.vm, phase="notify"):
        failed = notify_mod.send(cfg, msg)
    return EXIT_FAILED if failed else EXIT_OK


def _cmd_reload(cfg: Config, args: argparse.Namespace) -> int:
    from .actions.reload import reload

    reload(cfg, say=print)
    return EXIT_OK


def _cmd_init(cfg: Config, args: argparse.Namespace) -> int:
    ctx = _context(cfg)
    if ctx.restic.is_initialized():
        print(f"{mask_url(cfg.repository.url)}: already initialised")
    else:
        ctx.restic.init()
    ctx.store.remember_repository(cfg.repository.url)
    return EXIT_OK


VERBS: dict[str, Callable[[Config, argparse.Namespace], int]] = {
    "backup": _cmd_backup,
    "step": _cmd_step,
    "list": _cmd_list,
    "plan": _cmd_plan,
    "restore": _cmd_restore,
    "sweep": _cmd_sweep,
    "prune": _cmd_prune,
    "verify": _cmd_verify,
    "status": _cmd_status,
    "notify": _cmd_notify,
    "check-config": _cmd_check_config,
    "reload": _cmd_reload,
    "init": _cmd_init,
}


# Verbs that act on schedules get systemd's verdict on every calendar expression and time span up front.
SYSTEMD_CHECKED_VERBS = ("check-config", "reload")


# The failures main() reports in one line, by module. A module that was never imported cannot have raised
# its error, so looking them up lazily keeps each verb's imports its own.
FAILURES = (("systemd", "SystemdUnavailable"), ("actions.context", "StepError"), ("actions.context", "RestoreError"),
            ("lvm", "LvmError"), ("mount", "MountError"), ("repository", "RepositoryError"),
            ("hypervisor", "HypervisorError"))


def _loaded(module: str, name: str) -> type[BaseException] | None:
    mod = sys.modules.get(f"{__package__}.{module}")
    found = getattr(mod, name, None) if mod is not None else None
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


def _failures() -> tuple[type[BaseException], ...]:
    lazy = [t for module, name in FAILURES if (t := _loaded(module, name)) is not None]
    return (CommandError, OSError, *lazy)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(named_verb(argv)).parse_args(argv)
    journal.setup(debug=args.debug)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        cfg = config_mod.load(args.config, ask_systemd=args.verb in SYSTEMD_CHECKED_VERBS)
        return VERBS[args.verb](cfg, args)
    except ConfigError as exc:
        for line in exc.errors:
            log.error("%s", line)
        return EXIT_USAGE
    except Busy as exc:
        with journal.context(**journal.context_of(exc)):
            log.error("%s", exc)
        return EXIT_BUSY
    except Exception as exc:
        overflow = _loaded("actions.watch", "SnapshotOverflowed")
        if overflow and isinstance(exc, overflow):
            with journal.context(**journal.context_of(exc)):
                log.error("%s", exc)
            return EXIT_OVERFLOW
        if not isinstance(exc, _failures()):
            raise
        with journal.context(**journal.context_of(exc)):
            log.error("%s", exc, exc_info=args.debug)
            if isinstance(exc, CommandError) and exc.stderr_tail:
                log.error("%s said:\n%s", exc.program, exc.stderr_tail)
        return EXIT_FAILED
    except KeyboardInterrupt as exc:
        with journal.context(**journal.context_of(exc)):
            log.error("interrupted (%s); cleanup ran", exc or "SIGINT")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
