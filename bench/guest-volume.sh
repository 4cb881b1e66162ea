# Sourced by the bench scripts that run inside the test bed guest (host flavour): the seed layout, a volume
# group "system" on the spare disk with one ext4 LV "xenvm" mounted on /srv/xenvm, and vm1's config for it.
disk=/dev/disk/by-id/virtio-xbtest1

bench_volume() {  # LV size (lvcreate -L)
    wipefs -aq "$disk"
    pvcreate -q "$disk"
    vgcreate -q system "$disk"
    lvcreate -q -y -L "$1" -n xenvm system
    mkfs.ext4 -q /dev/system/xenvm
    mkdir -p /srv/xenvm
    mount /dev/system/xenvm /srv/xenvm
}

bench_config() {  # password file, snapshot_size, then any further lines for [vm.vm1]
    local pw=$1 size=$2
    shift 2
    echo bench-password > "$pw"
    mkdir -p /etc/xenbackup
    {
        printf '[repository]\nurl = "/var/tmp/xb-repo"\npassword_file = "%s"\n[vm.vm1]\n' "$pw"
        printf '%s\n' "$@"
        printf 'snapshot_size = "%s"\n' "$size"
        printf 'disks = [{ lv = "system/xenvm", mode = "files", path = "vm1" }]\n'
    } > /etc/xenbackup/xenbackup.toml
}
