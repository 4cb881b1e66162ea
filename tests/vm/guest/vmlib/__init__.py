"""Helpers for tests that run inside the test bed guest (root, real LVM, systemd, Xen).

vmlib.cmd      run(): subprocess with a hard timeout and readable failures; hashing
vmlib.storage  blank disks, VGs, filesystems, the seed layout, thin layout, snapshots
vmlib.xen      dom0 start-up, the busybox PV guest, xl create/shutdown/wait
"""
