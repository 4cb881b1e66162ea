#!/bin/bash
# The demo, run inside the xen flavour's dom0 by `make demo`
# (tests/vm/run-guest script --flavour xen tests/vm/demo/demo-in-guest.sh).
#
# It walks through the seed manual: VM vm1 lives in /srv/xenvm/vm1 on LV
# /dev/system/xenvm; a snapshot of the LV is mounted and read while vm1 runs,
# then removed. Every claim is checked, and the summary at the end (also
# written to /mnt/results/summary.txt) lists what was proven.
set -u -o pipefail
cd "$(dirname "$0")/../../.." || exit 1
export PYTHONPATH=tests/vm/guest

results=/mnt/results
summary=$(mktemp)
failures=0
vmlib() { timeout 600 python3 -m vmlib "$@"; }

section() { printf '\n=== %s\n' "$*"; }
show() { # print a command, then run it (with a hard timeout)
    printf '$ %s\n' "$*"
    timeout 300 "$@"
}
prove() { # CLAIM COMMAND...: run a check and record the claim as proven or not
    local claim=$1
    shift
    if timeout 300 "$@"; then
        echo "PROVEN   $claim" | tee -a "$summary"
    else
        echo "FAILED   $claim" | tee -a "$summary"
        failures=$((failures + 1))
    fi
}
finish() {
    section "Summary"
    cat "$summary"
    if [ "$failures" -eq 0 ]; then
        echo "All $(wc -l <"$summary") claims proven."
    else
        echo "$failures claim(s) NOT proven."
    fi
    cp "$summary" "$results/summary.txt" 2>/dev/null
    exit $((failures > 0))
}

section "Xen dom0"
vmlib xen-start || { echo "FAILED   the Xen toolstack starts in dom0" >>"$summary"; failures=1; finish; }
show xl info | grep -E '^(xen_version|virt_caps|total_memory|free_memory)'

section "The seed manual's layout: VG system, LV xenvm at /srv/xenvm, vm1 in /srv/xenvm/vm1"
layout=$(vmlib seed-layout --fs ext4) || { echo "FAILED   the seed layout can be built" >>"$summary"; failures=1; finish; }
echo "$layout"
marker=$(sed -n 's/^marker=//p' <<<"$layout")
show lvs -o lv_name,vg_name,lv_size,origin system
show ls -l /srv/xenvm/vm1
show cat /srv/xenvm/vm1/vm1.cfg
(cd /srv/xenvm/vm1 && sha256sum -- *) >/tmp/origin.sha256

section "Start PV guest vm1 from /srv/xenvm/vm1/vm1.cfg"
started=$(vmlib domu-start /srv/xenvm/vm1/vm1.cfg vm1)
echo "$started"
show xl list
prove "vm1 boots as a PV guest and reads its own disk image (marker '$marker')" \
    grep -qxF "marker=$marker" <<<"$started"

section "Configure xenbackup for vm1 (the seed's layout)"
mkdir -p /etc/xenbackup
cat >/etc/xenbackup/xenbackup.toml <<'TOML'
[vm.vm1]
domain_config = "/srv/xenvm/vm1/vm1.cfg"
snapshot_size = "1G"
disks = [{ lv = "system/xenvm", mode = "files", path = "vm1" }]
TOML
show cat /etc/xenbackup/xenbackup.toml
show xenbackup check-config
show xenbackup plan vm1

section "Back up the running vm1: systemctl start xenbackup@vm1"
domid_before=$(xl domid vm1)
prove "systemctl start xenbackup@vm1 succeeds while vm1 runs" timeout 900 systemctl start xenbackup@vm1
prove "vm1 kept running through the backup (same domain id)" test "$(xl domid vm1)" = "$domid_before"
show journalctl -u xenbackup@vm1 --no-pager -o short
show systemctl status xenbackup@vm1 --no-pager --lines=0
show xenbackup list vm1
prove "no snapshot of xenbackup is left" bash -c '[ -z "$(lvs --noheadings @xenbackup)" ]'
prove "nothing of xenbackup stays mounted" bash -c '! grep -q " /run/xenbackup/" /proc/self/mountinfo'
show journalctl -u xenbackup@vm1 --no-pager -o verbose MESSAGE_ID=14a99ce9301e4006b02b2ce251777ef6 \
    | grep -E "MESSAGE=|XENBACKUP_"

section "Damage vm1's files, then restore into the running guest with --stop"
printf 'XBMARKER damaged\n' | dd of=/srv/xenvm/vm1/disk.img conv=notrunc status=none
rm -f /srv/xenvm/vm1/initrd.img   # the guest cannot boot without it: the restore must bring it back
echo "garbage" >/srv/xenvm/vm1/extra-junk.txt
show sha256sum /srv/xenvm/vm1/disk.img
console=/var/log/xen/console/guest-vm1.log
offset=$(stat -c %s "$console" 2>/dev/null || echo 0)
prove "xenbackup restore vm1 --stop shuts vm1 down, restores, verifies and starts it" \
    timeout 900 xenbackup restore vm1 --stop
show journalctl --no-pager -o cat SYSLOG_IDENTIFIER=xenbackup XENBACKUP_VM=vm1 --since=-10min \
    | grep -E "restore|shutting|starting"
prove "every file of vm1 has its backed-up sha256 again" \
    bash -c 'cd /srv/xenvm/vm1 && sha256sum --quiet -c /tmp/origin.sha256'
(cd /srv/xenvm/vm1 && sha256sum -c /tmp/origin.sha256)
prove "vm1 runs again (a new domain id)" bash -c 'id=$(xl domid vm1) && [ "$id" != "'"$domid_before"'" ]'
prove "the restarted vm1 boots the restored disk (marker '$marker')" \
    bash -c 'for i in $(seq 1 240); do tail -c +'"$((offset + 1))"' '"$console"' | grep -qF "'"$marker"'" && exit 0; sleep 1; done; exit 1'

section "Shut vm1 down and wait until it has left xl list"
vmlib domu-stop vm1
prove "vm1 is gone from xl list after xl shutdown -w and the wait" bash -c '! xl domid vm1 2>/dev/null'

section "Clean up"
vmlib seed-teardown && echo "VG system removed, disk wiped"
finish
