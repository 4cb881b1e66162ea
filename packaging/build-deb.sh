#!/bin/sh
# Build xenbackup_*.deb from this tree: packaging/build-deb.sh [OUTDIR] (or `make deb`)
# Needs: debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools dpkg-dev fakeroot
set -eu
# pybuild must find Debian's python3 and its modules, not one that a developer's PATH puts first.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
top=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$top/dist}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/xenbackup" "$out"
tar -C "$top" --exclude=.git --exclude=./dist --exclude=./tests/vm/artifacts --exclude=__pycache__ \
    --exclude='*.egg-info' -cf - . | tar -C "$work/xenbackup" -xf -
cp -r "$work/xenbackup/packaging/debian" "$work/xenbackup/debian"
(cd "$work/xenbackup" && dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1) || { tail -40 "$work/build.log"; exit 1; }
cp "$work"/*.deb "$out"/
ls "$out"/*.deb
