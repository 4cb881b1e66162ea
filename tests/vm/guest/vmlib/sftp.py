"""An SFTP repository server in the guest: Debian's sshd, a `backup` user with key authentication only.

The client side (root, i.e. xenbackup) gets its own key and a known_hosts file pinned to the server's
ed25519 host key, so a test can also pin a wrong one.
"""

from __future__ import annotations

import pwd
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from vmlib.cmd import run

USER = "backup"
REPO_DIR = Path("/srv/restic")
URL = f"sftp:{USER}@localhost:{REPO_DIR}"
HOST_KEY = Path("/etc/ssh/ssh_host_ed25519_key.pub")
SSHD_DROPIN = Path("/etc/ssh/sshd_config.d/xbtest-fleet.conf")


@dataclass(frozen=True)
class SftpServer:
    url: str
    identity: Path
    known_hosts: Path
    """Pinned to the server's real host key."""
    wrong_known_hosts: Path
    """The same host name with another key, as after a man in the middle or a reinstalled server."""


def _known_hosts_line(public_key: Path) -> str:
    kind, key = public_key.read_text().split()[:2]
    return f"localhost {kind} {key}\n"


def start_sftp(client_dir: Path) -> SftpServer:
    """sshd on port 22 with password login off; a fresh client key authorised for `backup`."""
    assert shutil.which("sshd") or Path("/usr/sbin/sshd").exists(), "openssh-server is not in the image"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        run("useradd", "--create-home", "--shell", "/bin/sh", USER)
    # Debian ships `backup` as a system user (uid 34, home /var/backups) with nologin, which refuses the sftp
    # subsystem too; the repository's owner needs a shell.
    run("usermod", "--shell", "/bin/sh", USER)
    # Each ssh login through pam_systemd would otherwise start and stop a user manager for `backup` (about
    # 4 s of the one vCPU under TCG, per restic command); a repository server's account lingers.
    run("loginctl", "enable-linger", USER)
    REPO_DIR.mkdir(parents=True, exist_ok=True)
    run("chown", f"{USER}:{USER}", str(REPO_DIR))
    if not HOST_KEY.exists():
        run("ssh-keygen", "-A")
    SSHD_DROPIN.parent.mkdir(parents=True, exist_ok=True)
    SSHD_DROPIN.write_text("PasswordAuthentication no\nKbdInteractiveAuthentication no\nListenAddress 127.0.0.1\n")

    client_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = client_dir / "id_ed25519"
    identity.unlink(missing_ok=True)
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "xenbackup-fleet-test", "-f", str(identity))
    ssh_dir = Path(pwd.getpwnam(USER).pw_dir) / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(identity.with_suffix(".pub").read_text())
    run("chown", "-R", f"{USER}:{USER}", str(ssh_dir))

    known_hosts = client_dir / "known_hosts"
    known_hosts.write_text(_known_hosts_line(HOST_KEY))
    other = client_dir / "other_host_key"
    other.unlink(missing_ok=True)
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other))
    wrong = client_dir / "known_hosts.wrong"
    wrong.write_text(_known_hosts_line(other.with_suffix(".pub")))

    run("systemctl", "start", "ssh.service", timeout=60)
    deadline = time.monotonic() + 60
    probe = ["ssh", "-i", str(identity), "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known_hosts}",
             "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", f"{USER}@localhost", "true"]
    while run(*probe, check=False, timeout=60).returncode != 0:
        assert time.monotonic() < deadline, run(*probe, check=False).stderr
        time.sleep(1)
    return SftpServer(URL, identity, known_hosts, wrong)
