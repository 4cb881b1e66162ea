# Sourced by the guest bench scripts that back up the guest's own Python library (real files of mixed
# sizes, about 4500) as vm1: a volume group on the spare disk, a 512 MiB ext4 LV mounted on /srv/xenvm, a
# repository password in /root/bench-pw and a config for xenbackup@vm1 with an initialised repository.
. "$(dirname "$0")/guest-volume.sh"
bench_volume 512M
cp -a /usr/lib/python3.11 /srv/xenvm/vm1
sync
bench_config /root/bench-pw 256M
xenbackup init >/dev/null
