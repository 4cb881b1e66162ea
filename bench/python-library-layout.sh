# Sourced by the guest bench scripts that back up the guest's own Python library (real files of mixed
# sizes, about 4500) as vm1: a volume group on the spare disk, a 512 MiB ext4 LV mounted on /srv/xenvm, a
# repository password in /root/bench-pw and a config for xenbackup@vm1 with an initialised repository.
disk=/dev/disk/by-id/virtio-xbtest1
wipefs -aq "$disk"
pvcreate -q "$disk"
vgcreate -q system "$disk"
lvcreate -q -y -L 512M -n xenvm system
mkfs.ext4 -q /dev/system/xenvm
mkdir -p /srv/xenvm
mount /dev/system/xenvm /srv/xenvm
cp -a /usr/lib/python3.11 /srv/xenvm/vm1
sync
echo bench-password > /root/bench-pw
mkdir -p /etc/xenbackup
cat > /etc/xenbackup/xenbackup.toml <<TOML
[repository]
url = "/var/tmp/xb-repo"
password_file = "/root/bench-pw"
[vm.vm1]
snapshot_size = "256M"
disks = [{ lv = "system/xenvm", mode = "files", path = "vm1" }]
TOML
xenbackup init >/dev/null
