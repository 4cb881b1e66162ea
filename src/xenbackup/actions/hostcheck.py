"""`check-config` on the host itself: does every VG, LV and domain config the config names exist here?"""

from __future__ import annotations

import os

from ..config import Config
from ..lvm import Lvm, LvmError, is_missing
from ..run import CommandError


def host_problems(cfg: Config, lvm: Lvm) -> list[str]:
    """One 'file: key: what is wrong' line per missing VG, LV or domain config; [] when a run could start."""
    problems: list[str] = []
    vg_exists: dict[str, bool] = {}

    def has_vg(name: str) -> bool:
        if name not in vg_exists:
            try:
                lvm.vg(name)
                vg_exists[name] = True
            except LvmError:
                vg_exists[name] = False
            except CommandError as err:
                if not is_missing(err):
                    raise
                vg_exists[name] = False
        return vg_exists[name]

    for vm in cfg.vms.values():
        for i, disk in enumerate(vm.disks):
            key = f"{cfg.path}: vm.{vm.name}.disks[{i}].lv"
            if not has_vg(disk.lv.vg):
                problems.append(f"{key}: volume group {disk.lv.vg} does not exist on this host; "
                                f"a backup of {vm.name} would fail")
            elif lvm.lv(disk.lv) is None:
                problems.append(f"{key}: logical volume {disk.lv} does not exist on this host; "
                                f"a backup of {vm.name} would fail")
        # A VM whose disks are discovered reads its domain config for them; that check reports it already.
        if vm.domain_config and not vm.discovers_disks and not os.path.isfile(vm.domain_config):
            problems.append(f"{cfg.path}: vm.{vm.name}.domain_config: {vm.domain_config} does not exist on this "
                            f"host; a backup of {vm.name} would not save it and a restore could not start "
                            f"the VM")
    return problems
