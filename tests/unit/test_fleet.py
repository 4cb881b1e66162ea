"""Several hosts sharing one repository: each sees, restores and forgets only its own backups."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from xenbackup import cli, config
from xenbackup.actions import ops
from xenbackup.actions.backup import Context
from xenbackup.actions.restore import RestoreError, Restorer, RestoreRequest
from xenbackup.config import RepositoryConfig
from xenbackup.names import restic_tags as tags_for
from xenbackup.progress import describe
from xenbackup.repository import Progress, Restic, open_failure
from xenbackup.run import CommandError

HOST_CONFIG = """
[repository]
url = "{repo}"
password_file = "{pw}"
host = "{host}"
prune = {prune}
[settings]
runtime_dir = "{root}/run"
state_dir = "{root}/state"
metrics_file = ""
[defaults]
keep_last = 1
[vm.vm1]
hypervisor = "none"
disks = [{{ lv = "system/xenvm", mode = "files", path = "vm1" }}]
"""


@dataclass(frozen=True)
class FleetHost:
    name: str
    config: Path
    ctx: Context
    mnt: Path

    def back_up(self, content: bytes, run_id: str) -> None:
        """One files-mode run of vm1, stored the way the backup step stores it."""
        (self.mnt / "vm1").mkdir(parents=True, exist_ok=True)
        (self.mnt / "vm1" / "disk.img").write_bytes(content)
        self.ctx.restic.ensure_initialized()
        self.ctx.restic.backup(["vm1"], tags_for(self.name, "vm1", "system/xenvm", "files", run_id), self.name,
                               lambda p: None, cwd=str(self.mnt))


def fleet_host(tmp_path: Path, name: str, prune: bool = True) -> FleetHost:
    root = tmp_path / name
    root.mkdir()
    path = root / "xenbackup.toml"
    path.write_text(HOST_CONFIG.format(repo=tmp_path / "repo", pw=tmp_path / "pw", host=name, root=root,
                                       prune=str(prune).lower()))
    ctx = Context.from_config(config.load(str(path)))
    return FleetHost(name, path, ctx, root / "mnt")


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[FleetHost, FleetHost]:
    """hostA backs up vm1, then hostB backs up its own, different vm1 into the same repository."""
    a, b = fleet_host(tmp_path, "hostA"), fleet_host(tmp_path, "hostB")
    a.back_up(b"A" * 5000, "rA")
    b.back_up(b"B" * 5000, "rB")
    return a, b


def test_restore_takes_this_hosts_backup_not_another_hosts_newer_one(fleet, tmp_path: Path) -> None:
    a, _ = fleet
    target = tmp_path / "restored"
    Restorer(a.ctx, a.ctx.cfg.vm("vm1"), RestoreRequest(vm="vm1", to_path=str(target))).run()
    assert (target / "disk.img").read_bytes() == b"A" * 5000


def test_cli_restore_to_path_restores_this_hosts_bytes(fleet, tmp_path: Path) -> None:
    a, _ = fleet
    target = tmp_path / "cli-restored"
    assert cli.main(["--config", str(a.config), "restore", "vm1", "--to", str(target)]) == 0
    assert (target / "disk.img").read_bytes() == b"A" * 5000


def test_restore_with_host_takes_the_old_hosts_backup(fleet, tmp_path: Path) -> None:
    """Disaster recovery: hostB is gone, its vm1 comes back on hostA."""
    a, _ = fleet
    target = tmp_path / "recovered"
    assert cli.main(["--config", str(a.config), "restore", "vm1", "--host", "hostB", "--to", str(target)]) == 0
    assert (target / "disk.img").read_bytes() == b"B" * 5000


def test_restore_of_a_vm_only_another_host_backed_up_names_that_host(tmp_path: Path) -> None:
    a, b = fleet_host(tmp_path, "hostA"), fleet_host(tmp_path, "hostB")
    b.back_up(b"B" * 100, "rB")
    with pytest.raises(RestoreError, match=r"no backup of vm1 from host hostA.*--host hostB"):
        Restorer(a.ctx, a.ctx.cfg.vm("vm1"), RestoreRequest(vm="vm1", to_path=str(tmp_path / "t"))).run()
    assert not (tmp_path / "t").exists()


def test_list_shows_only_this_hosts_runs(fleet, capsys) -> None:
    a, _ = fleet
    assert cli.main(["--config", str(a.config), "list", "vm1", "--json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    assert [(r["vm"], r["run"], r["host"]) for r in rows] == [("vm1", "rA", "hostA")]


def test_list_of_another_host_and_of_all_hosts(fleet, capsys) -> None:
    a, _ = fleet
    assert cli.main(["--config", str(a.config), "list", "--host", "hostB"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["HOST", "VM"]
    assert [line.split()[:2] for line in lines[1:]] == [["hostB", "vm1"]]

    assert cli.main(["--config", str(a.config), "list", "--all-hosts"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["HOST", "VM"]
    assert sorted(line.split()[0] for line in lines[1:]) == ["hostA", "hostB"]

    assert cli.main(["--config", str(a.config), "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "VM", "one host listed: no host column"
    assert len(lines) == 2


def test_restore_test_checks_this_hosts_latest_run(fleet) -> None:
    a, b = fleet
    assert ops.restore_test(a.ctx, a.ctx.cfg.vm("vm1"), scratch_root=str(a.mnt.parent)).run_id == "rA"
    assert ops.restore_test(b.ctx, b.ctx.cfg.vm("vm1"), scratch_root=str(b.mnt.parent)).run_id == "rB"


def test_prune_forgets_only_this_hosts_snapshots(fleet) -> None:
    a, b = fleet
    a.back_up(b"A2" * 100, "rA2")
    b.back_up(b"B2" * 100, "rB2")
    assert ops.prune(a.ctx, a.ctx.cfg.vm("vm1")) == 1  # keep_last = 1 of hostA's two runs
    left = {(s.hostname, s.tag_value("run")) for s in a.ctx.restic.snapshots(["xenbackup"], any_host=True)}
    assert left == {("hostA", "rA2"), ("hostB", "rB"), ("hostB", "rB2")}


def test_each_host_of_the_fleet_sees_the_repository_alike(fleet) -> None:
    a, b = fleet
    assert {s.tag_value("run") for s in a.ctx.restic.snapshots(["xenbackup"])} == {"rA"}
    assert {s.tag_value("run") for s in b.ctx.restic.snapshots(["xenbackup"])} == {"rB"}
    assert os.path.isdir(a.ctx.cfg.repository.url)


def _pack_bytes(repo: Path) -> int:
    return sum(p.stat().st_size for p in (repo / "data").rglob("*") if p.is_file())


def test_only_the_designated_host_prunes_and_it_prunes_for_everyone(tmp_path: Path) -> None:
    worker = fleet_host(tmp_path, "hostA", prune=False)
    pruner = fleet_host(tmp_path, "hostB", prune=True)
    worker.back_up(os.urandom(400_000), "rA1")
    worker.back_up(os.urandom(400_000), "rA2")  # keep_last = 1 makes rA1 and its 400 kB garbage
    pruner.back_up(b"B" * 1000, "rB1")
    repo = tmp_path / "repo"
    before = _pack_bytes(repo)

    assert cli.main(["--config", str(worker.config), "prune"]) == 0
    left = {s.tag_value("run") for s in worker.ctx.restic.snapshots(["xenbackup"], any_host=True)}
    assert left == {"rA2", "rB1"}, "hostA forgets its own old run"
    assert _pack_bytes(repo) == before, "a host with prune = false removed data"

    assert cli.main(["--config", str(pruner.config), "prune"]) == 0
    assert {s.tag_value("run") for s in pruner.ctx.restic.snapshots(["xenbackup"], any_host=True)} == left
    assert _pack_bytes(repo) < before - 300_000, "the designated host's prune left hostA's forgotten data"
    worker.ctx.restic.check()


def test_the_readme_fleet_examples_are_valid(tmp_path: Path) -> None:
    import re

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    fleet = readme[readme.index("## Fleet"):]
    fleet = fleet[:fleet.index("\n## ", 1)]
    blocks = re.findall(r"```toml\n(.*?)```", fleet, re.S)
    assert len(blocks) == 2
    prunes = []
    for i, block in enumerate(blocks):
        path = tmp_path / f"fleet{i}.toml"
        path.write_text(block)
        prunes.append(config.load(str(path)).repository.prune)
    assert prunes == [True, False]


def test_a_failed_restic_names_its_repository_and_its_fatal_line_not_the_lock_removal_retries() -> None:
    stderr = (
        "Save(<data/1c2d>) returned error, retrying after 552ms: connection refused\n"
        "Fatal: unable to save snapshot: client.PutObject: dial tcp 127.0.0.1:7480: connect: connection refused\n"
        + "Remove(<lock/1feb63a6f2>) returned error, retrying after 803ms: connection refused\n" * 12
    )
    cfg = RepositoryConfig(url="s3:http://127.0.0.1:7480/xen-backups", password_file="/nonexistent",
                           environment_file=None, cache_dir="/nonexistent", host="xen3", compression="auto")
    error = Restic(cfg, credentials_dir="")._masked(CommandError(["restic", "backup"], 1, stderr))
    assert str(error) == ("restic failed with exit code 1 on repository s3:http://127.0.0.1:7480/xen-backups: "
                          "Fatal: unable to save snapshot: client.PutObject: dial tcp 127.0.0.1:7480: connect: "
                          "connection refused")


def test_a_lock_that_could_not_be_created_is_the_verdict_not_the_last_retry_notice() -> None:
    # restic 0.14 with radosgw stopped before its lock check: the backend's error has no stack and is no
    # Fatal, so restic prints it with "%+v", the cause first and then its wrapping message.
    url = "http://127.0.0.1:7480/xen-backups/?delimiter=%2F&encoding-type=url&list-type=2&prefix=locks%2F"
    refused = f'Get "{url}": dial tcp 127.0.0.1:7480: connect: connection refused'
    stderr = "".join(f"List(lock) returned error, retrying after {d}: {refused}\n" for d in ("552ms", "1.31s"))
    stderr += f"{refused}\nunable to create lock in backend\n"
    assert CommandError(["restic", "backup"], 1, stderr).cause() == f"unable to create lock in backend: {refused}"


def test_a_fatal_line_glued_to_a_retry_message_is_still_the_verdict() -> None:
    # Recorded in the fleet suite: restic's retry messages and its verdict share stderr without locking.
    lock = "Remove(<lock/1e4de9f531>) returned error, retrying after 803ms: dial tcp 127.0.0.1:7480: connection refused"
    stderr = (f"{lock}\n" * 3 + "error while unlocking: dial tcp 127.0.0.1:7480: connect: connection refused"
              "Fatal: unable to save snapshot: client.PutObject: Put \"http://127.0.0.1:7480/xen-backups/data/6f\": "
              "dial tcp 127.0.0.1:7480: connect: connection refused\n" + f"{lock}\n" * 8)
    error = CommandError(["restic", "backup"], 1, stderr)
    assert error.cause().startswith("Fatal: unable to save snapshot: client.PutObject")
    assert open_failure(stderr).startswith("Fatal: unable to save snapshot")


def test_progress_shows_an_eta_only_against_a_known_total_and_of_a_sane_length() -> None:
    # Measured in the fleet suite: a block-mode disk throttled by limit_upload, total unknown.
    unknown_total = Progress(percent=None, bytes_done=16 << 20, total_bytes=None, seconds_remaining=34084860461145,
                             files_done=0)
    assert "ETA" not in describe(unknown_total, "vm3 fleet/vm3")
    known = Progress(percent=50.0, bytes_done=8 << 20, total_bytes=16 << 20, seconds_remaining=3725, files_done=0)
    assert describe(known, "vm3") == "vm3, 50.0%, 8.0 MiB of 16.0 MiB, ETA 1:02:05"
    assert describe(replace(known, seconds_remaining=65), "vm3").endswith("ETA 1:05")
    assert "ETA" not in describe(replace(known, seconds_remaining=10**12), "vm3")
