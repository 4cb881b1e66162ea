#!/bin/sh
# Install xenbackup from this source tree, offline: the Python package, the units, the journald
# catalog and an example config. Needs python3-pystemd (Debian) or pystemd (PyPI), restic and lvm2.
set -eu
cd "$(dirname "$0")/.."
prefix=${PREFIX:-/usr/local}
unitdir=${UNITDIR:-$prefix/lib/systemd/system}
catalogdir=${CATALOGDIR:-/usr/lib/systemd/catalog}

# Debian marks its Python as externally managed; pip then installs into /usr/local beside it.
# (Debian's pip maps --prefix=/usr/local to /usr/local/local, so pass --prefix only when asked to.)
pip_args="--quiet --no-index --no-deps --no-build-isolation"
[ -n "${PREFIX:-}" ] && pip_args="$pip_args --prefix $PREFIX"
# shellcheck disable=SC2086
python3 -m pip install $pip_args --break-system-packages . 2>/dev/null ||
    python3 -m pip install $pip_args .
bin=$(PATH="$prefix/bin:$PATH" command -v xenbackup) || { echo "install.sh: xenbackup did not land on PATH" >&2; exit 1; }
bindir=$(dirname "$bin")

install -d "$unitdir" "$catalogdir" /etc/xenbackup
install -m 0644 units/*.service units/*.timer "$unitdir"/
generatordir=${GENERATORDIR:-$prefix/lib/systemd/system-generators}
install -d "$generatordir"
ln -sf "$bindir/xenbackup-generator" "$generatordir/xenbackup-generator"
install -m 0644 packaging/xenbackup.catalog "$catalogdir"/xenbackup.catalog
install -m 0644 packaging/xenbackup.toml.example /etc/xenbackup/xenbackup.toml.example
chmod 0700 /etc/xenbackup

if [ -d /run/systemd/system ]; then
    journalctl --update-catalog || true
    systemctl daemon-reload
    systemctl enable xenbackup-cleanup.service >/dev/null 2>&1 || true
    # Without --now the timers would wait for the next boot, and Xen hosts run for months.
    systemctl enable --now xenbackup-prune.timer xenbackup-verify.timer >/dev/null 2>&1 || true
fi
echo "xenbackup installed: $bin"
