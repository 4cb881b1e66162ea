"""xenbackup: live backups of Xen and KVM virtual machines on LVM, driven by systemd, stored with restic."""

__version__ = "0.1.0"
