# Sourced by the A/B bench scripts that run inside the test bed guest (host flavour): a small data set on a
# real LV, a config, an initialised repository, and one timed run of xenbackup@vm1.service as each kind.
# The sourcing script defines use KIND (switch the unit to that kind) and sets $results.
. "$(dirname "$0")/guest-volume.sh"

ab_setup() {
    bench_volume 256M
    mkdir -p /srv/xenvm/vm1
    head -c 20M /dev/urandom > /srv/xenvm/vm1/disk.img
    for i in $(seq 200); do echo "file $i" > "/srv/xenvm/vm1/f$i.txt"; done
    sync
    echo 'name = "vm1"' > /etc/xen-vm1.cfg
    bench_config /root/bench-pw 128M 'domain_config = "/etc/xen-vm1.cfg"'
    xenbackup init >/dev/null
}

ab_dropin() {  # the drop-in text for xenbackup@vm1.service, or nothing for the unit as packaged
    local dir=/run/systemd/system/xenbackup@vm1.service.d
    mkdir -p "$dir"
    if [ -n "${1:-}" ]; then printf '%s' "$1" > "$dir/ab.conf"; else rm -f "$dir/ab.conf"; fi
    systemctl daemon-reload
}

lifetime() {  # the last run's XENBACKUP_SNAPSHOT_SECONDS
    journalctl -u xenbackup@vm1.service -o json -n 200 | python3 -c '
import json, sys
found = [json.loads(l).get("XENBACKUP_SNAPSHOT_SECONDS") for l in sys.stdin]
print([f for f in found if f][-1])'
}

one() {  # kind, warm|cold
    use "$1"
    [ "$2" = warm ] || { sync; echo 3 > /proc/sys/vm/drop_caches; }
    local s e
    s=$(date +%s.%N)
    systemctl start xenbackup@vm1.service
    e=$(date +%s.%N)
    echo "$1-$2-wall $(python3 -c "print(round($e - $s, 3))")"
    echo "$1-$2-snapshot $(lifetime)"
}

ab_runs() {  # name, kind A, kind B, warm runs, cold runs: alternating, into $results/NAME.txt
    use "$2"; systemctl start xenbackup@vm1.service    # the first run stores everything once
    : > "$results/$1.txt"
    for _ in $(seq "$4"); do for kind in "$2" "$3"; do one "$kind" warm >> "$results/$1.txt"; done; done
    for _ in $(seq "$5"); do for kind in "$2" "$3"; do one "$kind" cold >> "$results/$1.txt"; done; done
    journalctl -u xenbackup@vm1.service -o short-precise > "$results/$1-journal.txt"
    python3 "$(dirname "$0")/medians.py" "$results/$1.txt" | sort | tee "$results/$1-summary.txt"
}
