#!/bin/bash
# In-guest runner. The image's testbed-run.service mounts the project tree
# read-only at /mnt/src and the results share at /mnt/results, then runs this
# file from the share, so changing it needs no image rebuild. The unit powers
# the guest off when this script returns (or overruns its limit).
#
# The host describes the job in /mnt/results/request.env:
#   XBTEST_FLAVOUR       host | xen
#   XBTEST_MODE          pytest | script
#   XBTEST_ARGS          (array) pytest arguments, or a script path and its arguments
#   XBTEST_STEP_TIMEOUT  seconds for the pytest/script step
#   XBTEST_INSTALL       deb (apt-get install ./XBTEST_DEB from the share) | script (packaging/install.sh)
#   XBTEST_DEB           the package's file name in /mnt/results
#
# Results: junit.xml, pytest.log or script.log, install.log/install.rc, dmesg.txt,
# journal.export, journal.txt, timings.txt, selfcheck.txt, xl-dmesg.txt and
# xen-logs/ (xen flavour), and exit-code last.
set -u -o pipefail

results=/mnt/results
src=/tmp/src
testbed=/usr/local/lib/xenbackup-testbed
export LC_ALL=C.UTF-8 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "XBTEST: $*"; }
error() { echo "XBTEST-ERROR $*"; }
now() { date +%s.%N; }
timing() { # NAME START
    awk -v name="$1" -v start="$2" -v end="$(now)" 'BEGIN { printf "%s %.1f\n", name, end - start }' \
        >>"$results/timings.txt"
}

# shellcheck source=/dev/null
. "$results/request.env" || {
    error "cannot read $results/request.env"
    exit 1
}
say "runner started: flavour=$XBTEST_FLAVOUR mode=$XBTEST_MODE args=${XBTEST_ARGS[*]}"

# 1. Self-check. Under TCG a wrong CPU model shows up as files that read back
# wrong; stop here rather than report random test failures.
if ! (cd / && timeout 120 sha256sum --check --quiet "$testbed/selfcheck.sha256") >"$results/selfcheck.txt" 2>&1; then
    error "self-check failed: binaries in the guest do not match the image ($(head -n 3 "$results/selfcheck.txt" | tr '\n' ' '))"
    exit 1
fi

# 2. A private, writable copy of the project tree.
t=$(now)
rm -rf "$src" && mkdir -p "$src"
if ! timeout 300 tar -C /mnt/src --exclude=./.git --exclude=./tests/vm/artifacts --exclude=./.venv \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.mypy_cache --exclude=.ruff_cache \
    --exclude=.pytest_cache -cf - . | timeout 300 tar -C "$src" -xf -; then
    error "copying /mnt/src to $src failed"
    exit 1
fi
timing copy "$t"

# 3. Install the product offline: the .deb the host built (the admin's path),
# or packaging/install.sh where a suite keeps that path proven. The image
# holds every dependency, so apt needs no network and no package lists.
t=$(now)
case ${XBTEST_INSTALL:-script} in
deb)
    say "installing the product: apt-get install ./$XBTEST_DEB"
    mkdir -p /var/cache/xenbackup-testbed
    {
        cp "$results/$XBTEST_DEB" /var/cache/xenbackup-testbed/ &&
            cd /var/cache/xenbackup-testbed &&
            DEBIAN_FRONTEND=noninteractive timeout --kill-after=10 600 \
                apt-get install --yes -o Dpkg::Use-Pty=0 "./$XBTEST_DEB"
    } >"$results/install.log" 2>&1
    rc=$?
    # The package suite reinstalls after dpkg --purge from here.
    export XBTEST_PACKAGE=/var/cache/xenbackup-testbed/$XBTEST_DEB
    ;;
*)
    say "installing the product: packaging/install.sh"
    (cd "$src" && timeout --kill-after=10 600 bash packaging/install.sh) >"$results/install.log" 2>&1
    rc=$?
    ;;
esac
echo "$rc" >"$results/install.rc"
timing install "$t"
[ "$rc" -eq 0 ] || say "installing the product failed with exit code $rc (see install.log); running the tests anyway"

# 4. The job itself. The kernel's log streams to the share as it is written: a guest that hangs in the
# kernel is killed before its journal is exported, and the console only gets the first line of a
# hung-task report (the quiet console level hides its stack).
dmesg --follow >"$results/dmesg.txt" 2>&1 &
dmesg_pid=$!
t=$(now)
cd "$src" || exit 1
case $XBTEST_MODE in
pytest)
    # SIGINT on overrun: pytest stops like on Ctrl-C and still writes junit.xml,
    # so the tests that finished are reported; a broken test file does not
    # stop the others from running.
    timeout --signal=INT --kill-after=60 "$XBTEST_STEP_TIMEOUT" \
        python3 -m pytest -p no:cacheprovider -c tests/vm/guest/pytest.ini --rootdir tests/vm/guest \
        -ra --continue-on-collection-errors --junitxml="$results/junit.xml" "${XBTEST_ARGS[@]}" 2>&1 |
        tee "$results/pytest.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] &&
        say "the pytest step exceeded its limit of ${XBTEST_STEP_TIMEOUT}s and was interrupted" | tee -a "$results/pytest.log"
    ;;
script)
    timeout --kill-after=30 "$XBTEST_STEP_TIMEOUT" bash "${XBTEST_ARGS[@]}" 2>&1 | tee "$results/script.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && error "the script exceeded its limit of ${XBTEST_STEP_TIMEOUT}s"
    ;;
*)
    error "unknown XBTEST_MODE '$XBTEST_MODE'"
    rc=2
    ;;
esac
timing "$XBTEST_MODE" "$t"
kill "$dmesg_pid" 2>/dev/null

# 5. Logs for the artifacts.
t=$(now)
timeout 120 journalctl --no-pager -o export >"$results/journal.export" 2>/dev/null
timeout 120 journalctl --no-pager -o short-precise >"$results/journal.txt" 2>/dev/null
if grep -qs control_d /proc/xen/capabilities; then
    timeout 60 xl dmesg >"$results/xl-dmesg.txt" 2>&1
    timeout 60 cp -r /var/log/xen "$results/xen-logs" 2>/dev/null
fi
timing logs "$t"

echo "$rc" >"$results/exit-code"
sync
say "runner finished: exit code $rc"
exit "$rc"
