#!/bin/bash
# Build the test bed image into OUTDIR (an empty directory on the cache's
# filesystem). Called by xbtestbed/image.py, which owns caching and the atomic
# rename; run it by hand only to debug a build.
#
#   build.sh OUTDIR SOURCES_FILE [APT_OPTION...]
#
# SOURCES_FILE holds the apt sources to build from (the host's Debian
# bookworm entries); each APT_OPTION is passed to mmdebstrap as --aptopt.
#
# OUTDIR receives: rootfs.img (raw ext4), vmlinuz, initrd.img, xen (the
# uncompressed multiboot hypervisor), packages.lock (dpkg -l of the image).
set -euo pipefail

out=${1:?usage: build.sh OUTDIR SOURCES_FILE [APT_OPTION...]}
sources=${2:?usage: build.sh OUTDIR SOURCES_FILE [APT_OPTION...]}
shift 2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
rootfs_size=${XENBACKUP_TESTVM_ROOTFS_SIZE:-8G}

packages=$(sed -e 's/#.*//' "$here/packages.txt" | tr -s ' \n' ',' | sed -e 's/^,//' -e 's/,$//')
aptopts=()
for opt in "$@"; do aptopts+=(--aptopt="$opt"); done

root="$out/root"
step() { printf '[build %(%H:%M:%S)T] %s\n' -1 "$*"; }

step "mmdebstrap bookworm minbase ($(tr ',' '\n' <<<"$packages" | wc -l) packages)"
# Xen's maintainer scripts and update-initramfs run inside the chroot.
mmdebstrap --variant=minbase --mode=root --format=directory \
    --include="$packages" \
    --aptopt='APT::Install-Recommends "false"' \
    "${aptopts[@]}" \
    bookworm "$root" "$sources"

step "configure the guest"
echo xbtest >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\txbtest\n' >"$root/etc/hosts"
: >"$root/etc/resolv.conf"
# The root disk is always the first virtio disk. Each boot runs on a fresh
# copy-on-write overlay, so skip fsck.
echo '/dev/vda / ext4 defaults 0 0' >"$root/etc/fstab"
# A fixed machine id: no first-boot logic (systemd-firstboot would prompt on
# the console), and journal exports from different boots look alike.
echo 5b7c1d0e2f3a4b5c6d7e8f9a0b1c2d3e >"$root/etc/machine-id"

# The getty on the serial console clobbers what the runner writes there.
# Timers and xendomains only cost boot/shutdown time in a throwaway guest.
chroot "$root" systemctl mask --quiet \
    serial-getty@ttyS0.service serial-getty@hvc0.service getty@tty1.service \
    systemd-firstboot.service xendomains.service \
    apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
    2>/dev/null || true
for unit in serial-getty@ttyS0.service serial-getty@hvc0.service xendomains.service; do
    [ "$(readlink "$root/etc/systemd/system/$unit")" = /dev/null ] || {
        echo "build.sh: failed to mask $unit" >&2
        exit 1
    }
done

# Debian's xen init script passes XENCONSOLED_ARGS on: keep every domU's
# console in /var/log/xen/console/guest-NAME.log for tests and artifacts.
echo 'XENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console"' >>"$root/etc/default/xen"
install -d "$root/var/log/xen/console"

# libvirt only serves the kvm suite, which starts libvirtd itself: at boot
# it would probe qemu's capabilities under TCG in every suite. Its default
# NAT network needs dnsmasq, which the image does not carry.
chroot "$root" systemctl disable --quiet \
    libvirtd.service libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket libvirt-guests.service
rm -f "$root/etc/libvirt/qemu/networks/autostart/default.xml"

# Ceph and sshd only serve the fleet suite, which starts them itself.
# One unit a call: systemctl refuses the whole list when one name is unknown.
for unit in ssh.service ssh.socket ceph.target ceph-crash.service ceph-mon.target ceph-mgr.target \
    ceph-osd.target ceph-radosgw.target; do
    chroot "$root" systemctl disable --quiet "$unit" 2>/dev/null || true
done

lib="$root/usr/local/lib/xenbackup-testbed"
install -d "$lib" "$root/mnt/src" "$root/mnt/results"
install -m 0755 "$here/testbed-boot.sh" "$lib/testbed-boot.sh"
install -m 0644 "$here/testbed-run.service" "$root/etc/systemd/system/testbed-run.service"
chroot "$root" systemctl enable --quiet testbed-run.service

# Reference hashes for the runner's self-check: under TCG a bad CPU model
# shows up as files that read back wrong (see tests/vm/README.md).
(cd "$root" && sha256sum usr/sbin/xl usr/bin/python3.11 sbin/lvm usr/bin/restic bin/busybox \
    >"$lib/selfcheck.sha256")

chroot "$root" dpkg-query -W -f='${Package} ${Version}\n' >"$out/packages.lock"
cp "$out/packages.lock" "$lib/packages.lock"

step "extract kernel, initrd and Xen"
kernels=("$root"/boot/vmlinuz-*)
initrds=("$root"/boot/initrd.img-*)
[ ${#kernels[@]} -eq 1 ] && [ ${#initrds[@]} -eq 1 ] && [ -f "${initrds[0]}" ] || {
    echo "build.sh: expected exactly one kernel and initrd in /boot, found: ${kernels[*]} ${initrds[*]}" >&2
    exit 1
}
cp "${kernels[0]}" "$out/vmlinuz"
cp "${initrds[0]}" "$out/initrd.img"
# qemu's multiboot loader wants the plain 32-bit ELF, not the .gz.
zcat "$root"/boot/xen-4.17-amd64.gz >"$out/xen"

step "mkfs.ext4 -d ($rootfs_size sparse)"
rm -f "$out/rootfs.img"
truncate -s "$rootfs_size" "$out/rootfs.img"
mkfs.ext4 -q -F -L xbroot -d "$root" "$out/rootfs.img"
rm -rf "$root"
step "done"
