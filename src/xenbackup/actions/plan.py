"""`xenbackup plan VM`: every command a run would execute, computed without changing anything."""

from __future__ import annotations

from .. import names
from ..model import VM, Consistency, DiskMode, HypervisorKind, PlannedCommand, snapshot_name
from ..mount import mount_options
from .context import Context
from .window import choose


def _window_argv(ctx: Context, vm: VM, disk_count: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The pause and resume commands a run would use ("auto" as it would be decided without an agent)."""
    method = choose(vm.consistency, vm.hypervisor, disk_count, lambda: False)
    xl, virsh = ctx.cfg.command("xl"), ctx.cfg.command("virsh")
    if method is Consistency.FREEZE:
        return (virsh, "domfsfreeze", vm.name), (virsh, "domfsthaw", vm.name)
    if method is Consistency.PAUSE:
        if vm.hypervisor is HypervisorKind.KVM:
            return (virsh, "suspend", vm.name), (virsh, "resume", vm.name)
        return (xl, "pause", vm.name), (xl, "unpause", vm.name)
    return (), ()


def plan(ctx: Context, vm: VM) -> list[PlannedCommand]:
    """Every command a run would execute, computed without touching anything."""
    out: list[PlannedCommand] = []
    stamp = "<YYYYmmddHHMMSS>"
    run_id = "<run-id>"
    tags = names.lv_tags(vm.name, run_id)
    out.append(PlannedCommand("snapshot", tuple(ctx.lvm.overview_argv()),
                              "every LV and its VG: leftovers of a crashed run (removed if found), the origins "
                              "and the free space"))
    disks = ctx.disks(vm)
    for disk in disks:
        where = "configured" if disk.source == "config" else f"found in the domain definition: {disk.source}"
        out.append(PlannedCommand("disks", (str(disk.lv), disk.mode.value, disk.path), where))
    config = vm.domain_config
    carrier = next((d for d in disks if config and d.mode is DiskMode.FILES
                    and names.config_rides_along(d.path, config)), None)
    config_tags = names.restic_tags(ctx.host, vm.name, names.CONFIG_DISK, names.CONFIG_DISK, run_id)
    if config and carrier is None and not vm.discovers_disks:
        out.append(PlannedCommand("snapshot", tuple(ctx.restic.backup_argv([config], config_tags, ctx.host)),
                                  "the domain config, if it exists, before any snapshot: no disk's run can carry "
                                  "it, and this run of restic is also the repository key check"))
    pause, resume = _window_argv(ctx, vm, len(disks))
    if pause:
        out.append(PlannedCommand("snapshot", pause, f"{vm.consistency}: hold the guest still; at most "
                                  f"{vm.max_pause} s, only if it is running"))
    for disk in disks:
        name = snapshot_name(vm.name, disk, stamp)
        out.append(PlannedCommand("snapshot", tuple(ctx.lvm.create_snapshot_argv(
            disk.lv, name, vm.snapshot_size, tags)), "a thin origin gets a thin snapshot without --size"))
    if resume:
        out.append(PlannedCommand("snapshot", resume, "at once after the last snapshot"))
    for disk in disks:
        if disk.mode is DiskMode.FILES:
            name = snapshot_name(vm.name, disk, stamp)
            target = ctx.store.mountpoint(vm.name, disk.slug)
            opts = mount_options("<fstype>", True, disk.mount_options)
            out.append(PlannedCommand("mount", tuple(ctx.mounter.mount_argv(
                f"/dev/{disk.lv.vg}/{name}", target, "<fstype>", opts)),
                "xfs adds nouuid,norecovery; ext4 adds noload only when its journal is dirty"))
    for disk in disks:
        tags_r = names.restic_tags(ctx.host, vm.name, str(disk.lv), disk.mode.value, run_id)
        if disk.mode is DiskMode.FILES:
            with_config = [config] if config and disk is carrier else []
            argv = ctx.restic.backup_argv([disk.path, *with_config],
                                          tags_r + ([names.CONFIG_INSIDE] if with_config else []), ctx.host)
            note = f"in {ctx.store.mountpoint(vm.name, disk.slug)}"
            if with_config:
                note += ", with the domain config if it exists"
        else:
            argv = ctx.restic.backup_argv([], tags_r, ctx.host, stdin_filename=f"{disk.slug}.img")
            note = f"stdin from /dev/{disk.lv.vg}/{snapshot_name(vm.name, disk, stamp)}"
            if ctx.cfg.settings.thin_incremental:
                out.append(PlannedCommand("backup", tuple(argv), note + " (a classic origin)"))
                argv = ctx.restic.backup_argv([ctx.store.mountpoint(vm.name, disk.slug)],
                                              [*tags_r, names.SEGMENTED_TAG], ctx.host,
                                              options=["--parent", "<the base run's restic snapshot>"])
                note = ("a thin origin instead: its snapshot as segment files (FUSE); thin_delta against the base "
                        f"tagged {names.lv_base_tag(vm.name)} says which changed, restic takes the others from "
                        "the parent unread (--force instead of --parent without a usable base)")
        out.append(PlannedCommand("backup", tuple(argv), note))
    if config and carrier is None and vm.discovers_disks:
        out.append(PlannedCommand("backup", tuple(ctx.restic.backup_argv([config], config_tags, ctx.host)),
                                  "the domain config, if it exists and no discovered disk's run carried it"))
    for disk in disks:
        name = snapshot_name(vm.name, disk, stamp)
        if disk.mode is DiskMode.FILES:
            out.append(PlannedCommand("cleanup", (ctx.cfg.command("umount"),
                                                  ctx.store.mountpoint(vm.name, disk.slug))))
        out.append(PlannedCommand("cleanup", tuple(ctx.lvm.remove_argv(type(disk.lv)(disk.lv.vg, name)))))
    return out
