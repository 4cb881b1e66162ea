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

section "Backup window: snapshot, mount read-only, read (vm1 keeps running)"
show lvcreate -L1G -s -n vmbackup /dev/system/xenvm
mkdir -p /mnt/vmbackup
# ext4 would replay its journal on mount; noload keeps the snapshot untouched.
show mount -o ro,noload /dev/system/vmbackup /mnt/vmbackup
show findmnt /mnt/vmbackup
prove "the snapshot mounts read-only while vm1 runs" bash -c 'findmnt -n -o OPTIONS /mnt/vmbackup | grep -q "^ro"'
prove "vm1 is still running during the backup window" xl domid vm1
prove "every file of vm1 in the snapshot has the origin's sha256" \
    bash -c 'cd /mnt/vmbackup/vm1 && sha256sum --quiet -c /tmp/origin.sha256'
# Product steps (e.g. `systemctl start xenbackup@vm1`) go here.
show umount /mnt/vmbackup
show lvremove -f /dev/system/vmbackup
prove "the snapshot is gone afterwards" bash -c '! lvs system/vmbackup 2>/dev/null'

section "Shut vm1 down and wait until it has left xl list"
vmlib domu-stop vm1
prove "vm1 is gone from xl list after xl shutdown -w and the wait" bash -c '! xl domid vm1 2>/dev/null'

section "Clean up"
vmlib seed-teardown && echo "VG system removed, disk wiped"
finish
