"""Hypervisor adapter: xl (Xen), virsh (KVM/libvirt) or none, behind one small interface."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from .model import VM, DomainDisk, HypervisorKind
from .run import CommandError, run

log = logging.getLogger(__name__)


class HypervisorError(Exception):
    pass


class Hypervisor(Protocol):
    def is_running(self, name: str) -> bool: ...
    def shutdown(self, name: str, timeout: float) -> None: ...
    def start(self, name: str, domain_config: str | None) -> None: ...
    def disks(self, name: str, domain_config: str | None) -> list[DomainDisk]: ...
    def is_paused(self, name: str) -> bool: ...
    def pause(self, name: str) -> None: ...
    def unpause(self, name: str) -> None: ...
    def agent_answers(self, name: str) -> bool: ...
    def freeze(self, name: str) -> None: ...
    def thaw(self, name: str) -> None: ...


class NoHypervisor:
    """Plain LVs: nothing to stop, start, discover or pause."""

    def is_running(self, name: str) -> bool:
        return False

    def shutdown(self, name: str, timeout: float) -> None:
        return None

    def start(self, name: str, domain_config: str | None) -> None:
        return None

    def disks(self, name: str, domain_config: str | None) -> list[DomainDisk]:
        raise HypervisorError(f"hypervisor = \"none\" has no domain definition to read: list the disks of "
                              f"vm.{name} in its `disks` key")

    def is_paused(self, name: str) -> bool:
        return False

    def pause(self, name: str) -> None:
        raise HypervisorError("hypervisor = \"none\" cannot pause a guest")

    unpause = thaw = freeze = pause

    def agent_answers(self, name: str) -> bool:
        return False


# --- the hypervisors' own machine-readable domain definitions ---------------------------------

def parse_xl_config(stdout: str, command: str = "xl") -> list[DomainDisk]:
    """Disks from libxl's JSON: `xl -N create CFG` (one config) or `xl list -l NAME` ([{"config": ...}])."""
    try:
        data: Any = json.loads(stdout)
        if isinstance(data, list):
            if len(data) != 1 or not isinstance(data[0], dict):
                raise ValueError(f"expected one domain, got {len(data)}")
            data = data[0].get("config", data[0])
        raw = data.get("disks", [])
        if not isinstance(raw, list) or not all(isinstance(d, dict) for d in raw):
            raise ValueError("'disks' is not a list of objects")
    except (ValueError, AttributeError) as exc:
        raise HypervisorError(f"{command} printed a domain config xenbackup cannot read: {exc}") from None
    disks = []
    for i, d in enumerate(raw):
        target = str(d.get("vdev") or f"disk{i}")
        # libxl leaves out fields at their defaults: no is_cdrom means a disk, no pdev_path an empty drive.
        disks.append(DomainDisk(target=target, source=str(d.get("pdev_path") or ""), cdrom=bool(d.get("is_cdrom"))))
    return disks


def parse_virsh_xml(text: str) -> list[DomainDisk]:
    """Disks from `virsh dumpxml NAME`."""
    # Only KVM hosts read XML; a Xen host's every step would pay for the parser otherwise.
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise HypervisorError(f"virsh dumpxml printed XML xenbackup cannot read: {exc}") from None
    disks = []
    for i, el in enumerate(root.findall("./devices/disk")):
        target_el = el.find("target")
        target = (target_el.get("dev") if target_el is not None else None) or f"disk{i}"
        source_el = el.find("source")
        kind = el.get("type", "file")
        source = ""
        network = ""
        if source_el is not None:
            if kind == "network":
                network = source_el.get("protocol", "network")
                source = source_el.get("name", "")
            elif kind == "volume":
                network = "libvirt storage volume"
                source = f"{source_el.get('pool', '')}/{source_el.get('volume', '')}"
            else:
                source = source_el.get("dev") or source_el.get("file") or ""
        disks.append(DomainDisk(target=target, source=source, cdrom=el.get("device") in ("cdrom", "floppy"),
                                network=network))
    return disks


def parse_xl_state(stdout: str, name: str) -> str:
    """The State column of `xl list NAME` (xl offers no JSON for it), e.g. "-b----" or "--p---"."""
    for line in stdout.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 5 and cols[0] == name:
            return cols[4]
    raise HypervisorError(f"xl list {name} printed no row for {name}")


class _Polling:
    sleep: Callable[[float], None] = staticmethod(time.sleep)
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def is_running(self, name: str) -> bool:
        raise NotImplementedError

    def _wait_gone(self, name: str, timeout: float) -> bool:
        deadline = self.clock() + timeout
        while self.clock() < deadline:
            if not self.is_running(name):
                return True
            self.sleep(0.5)
        return not self.is_running(name)


class Xl(_Polling):
    def __init__(self, xl: str = "xl") -> None:
        self.xl = xl

    def is_running(self, name: str) -> bool:
        # `xl domid` fails once the domain has really left; `xl shutdown -w` returns earlier.
        return run([self.xl, "domid", name], check=False).returncode == 0

    def shutdown(self, name: str, timeout: float) -> None:
        if not self.is_running(name):
            return
        log.info("shutting down Xen domain %s", name)
        try:
            run([self.xl, "shutdown", "-w", name], timeout=timeout)
        except CommandError as err:
            log.warning("xl shutdown of %s did not finish: %s", name, err)
        if not self._wait_gone(name, timeout):
            log.warning("domain %s ignored shutdown for %.0f s; destroying it", name, timeout)
            run([self.xl, "destroy", name])
            if not self._wait_gone(name, 30):
                raise HypervisorError(f"domain {name} is still present after xl destroy")

    def start(self, name: str, domain_config: str | None) -> None:
        if not domain_config:
            raise HypervisorError(f"no domain config for {name}: set vm.{name}.domain_config")
        run([self.xl, "create", domain_config])

    def disks(self, name: str, domain_config: str | None) -> list[DomainDisk]:
        """The running domain's disks, else those of its config file, as libxl itself parses them."""
        if self.is_running(name):
            argv = [self.xl, "list", "-l", name]
        elif domain_config:
            # -N: parse and print, start nothing.
            argv = [self.xl, "-N", "create", domain_config]
        else:
            raise HypervisorError(f"{name} is not running and has no domain config to read its disks from")
        try:
            out = run(argv)
        except CommandError as err:
            raise HypervisorError(f"cannot read the disks of {name}: {err}") from None
        return parse_xl_config(out.stdout, " ".join(argv[:3]))

    def is_paused(self, name: str) -> bool:
        return "p" in parse_xl_state(run([self.xl, "list", name]).stdout, name)

    def pause(self, name: str) -> None:
        run([self.xl, "pause", name])

    def unpause(self, name: str) -> None:
        run([self.xl, "unpause", name])

    def agent_answers(self, name: str) -> bool:
        return False

    def freeze(self, name: str) -> None:
        raise HypervisorError("Xen has no guest agent to freeze filesystems; use consistency = \"pause\"")

    thaw = freeze


class Virsh(_Polling):
    def __init__(self, virsh: str = "virsh") -> None:
        self.virsh = virsh

    def is_running(self, name: str) -> bool:
        out = run([self.virsh, "domstate", name], check=False)
        return out.returncode == 0 and out.stdout.strip() not in ("shut off", "crashed", "")

    def shutdown(self, name: str, timeout: float) -> None:
        if not self.is_running(name):
            return
        run([self.virsh, "shutdown", name])
        if not self._wait_gone(name, timeout):
            log.warning("domain %s ignored shutdown for %.0f s; destroying it", name, timeout)
            run([self.virsh, "destroy", name])

    def start(self, name: str, domain_config: str | None) -> None:
        run([self.virsh, "start", name])

    def disks(self, name: str, domain_config: str | None) -> list[DomainDisk]:
        try:
            out = run([self.virsh, "dumpxml", name])
        except CommandError as err:
            raise HypervisorError(f"cannot read the disks of {name}: {err}") from None
        return parse_virsh_xml(out.stdout)

    def is_paused(self, name: str) -> bool:
        out = run([self.virsh, "domstate", name], check=False)
        return out.returncode == 0 and out.stdout.strip() == "paused"

    def pause(self, name: str) -> None:
        run([self.virsh, "suspend", name])

    def unpause(self, name: str) -> None:
        run([self.virsh, "resume", name])

    def agent_answers(self, name: str) -> bool:
        out = run([self.virsh, "qemu-agent-command", name, '{"execute":"guest-ping"}', "--timeout", "5"],
                  check=False, timeout=15)
        return out.returncode == 0

    def freeze(self, name: str) -> None:
        run([self.virsh, "domfsfreeze", name], timeout=60)

    def thaw(self, name: str) -> None:
        run([self.virsh, "domfsthaw", name], timeout=60)


def for_vm(vm: VM, commands: Mapping[str, str]) -> Hypervisor:
    if vm.hypervisor is HypervisorKind.XEN:
        return Xl(commands["xl"])
    if vm.hypervisor is HypervisorKind.KVM:
        return Virsh(commands["virsh"])
    return NoHypervisor()
