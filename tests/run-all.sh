#!/bin/sh
# `make test`: the unit tests on every core (pytest-xdist) while the VM image is built beside them (minutes of
# mmdebstrap on a cold cache, nothing on a warm one), then the VM suites, two guests at a time. The VM suites
# do not start before the unit tests end: a guest's timing-sensitive tests must not share its core.
set -u
PYTHON=${PYTHON:-python3}
artifacts=${XENBACKUP_TESTVM_ARTIFACTS:-tests/vm/artifacts}
mkdir -p "$artifacts"
"$PYTHON" tests/vm/run-guest build > "$artifacts/image-build-early.log" 2>&1 &
build=$!
"$PYTHON" -m pytest -ra -n auto tests/unit
unit=$?
# A failed build is not reported here: the first boot builds the image again and reports why it cannot.
wait "$build" || echo "building the VM image beside the unit tests failed; the first boot tries again" >&2
"$PYTHON" -m pytest -ra tests/vm
vm=$?
for rc in "$unit" "$vm"; do
    [ "$rc" -ne 5 ] || echo "pytest collected no tests: that is a failure here" >&2
done
[ "$unit" -eq 0 ] && [ "$vm" -eq 0 ]
