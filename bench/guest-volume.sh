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

bench_dataset() {  # MB of mixed-content image (¼ random, ¼ zeros, ½ text), number of small files
    mkdir -p /srv/xenvm/vm1/small
    python3 - "$1" "$2" <<'PY'
import os, random, sys
mb, n = int(sys.argv[1]), int(sys.argv[2])
rnd = random.Random(1)
with open("/srv/xenvm/vm1/disk.img", "wb") as f:
    for i in range(mb):
        kind = i % 4
        if kind == 0:
            f.write(os.urandom(1 << 20))                    # incompressible
        elif kind == 1:
            f.write(bytes(1 << 20))                         # zeros
        else:
            words = [rnd.choice(["xen", "lvm", "restic", "backup", "snapshot", "journal"]) for _ in range(200)]
            f.write((" ".join(words) * 200).encode()[: 1 << 20].ljust(1 << 20, b"."))
for i in range(n):
    with open(f"/srv/xenvm/vm1/small/f{i:05d}.txt", "w") as f:
        f.write(f"file {i}\n" * rnd.randint(1, 200))
PY
    sync
}
