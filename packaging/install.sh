#!/bin/sh
# Install xenbackup from this source tree, offline: the Python package, the units, the journald
# catalog and an example config. Needs python3-pystemd (Debian) or pystemd (PyPI), restic and lvm2.
set -eu
cd "$(dirname "$0")/.."
prefix=${PREFIX:-/usr/local}
unitdir=${UNITDIR:-$prefix/lib/systemd/system}
catalogdir=${CATALOGDIR:-/usr/lib/systemd/catalog}

# Debian marks its Python as externally managed; this installs into /usr/local, beside it.
python3 -m pip install --quiet --no-index --no-deps --no-build-isolation --break-system-packages \
    --prefix "$prefix" . 2>/dev/null ||
python3 -m pip install --quiet --no-index --no-deps --no-build-isolation --prefix "$prefix" .

install -d "$unitdir" "$catalogdir" /etc/xenbackup
install -m 0644 units/*.service units/*.timer "$unitdir"/
generatordir=${GENERATORDIR:-$prefix/lib/systemd/system-generators}
install -d "$generatordir"
ln -sf "$prefix/bin/xenbackup-generator" "$generatordir/xenbackup-generator"
install -m 0644 packaging/xenbackup.catalog "$catalogdir"/xenbackup.catalog
install -m 0644 packaging/xenbackup.toml.example /etc/xenbackup/xenbackup.toml.example
chmod 0700 /etc/xenbackup

if [ -d /run/systemd/system ]; then
    journalctl --update-catalog || true
    systemctl daemon-reload
    systemctl enable xenbackup-cleanup.service xenbackup-prune.timer xenbackup-verify.timer >/dev/null 2>&1 || true
fi
echo "xenbackup installed: $(command -v xenbackup || echo "$prefix/bin/xenbackup")"
