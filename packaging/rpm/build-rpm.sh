#!/bin/sh
# Build xenbackup-*.noarch.rpm from this tree: packaging/rpm/build-rpm.sh [OUTDIR] (or `make rpm`)
# Needs rpmbuild (Debian: the rpm package) and python3 with pip, setuptools and wheel.
set -eu
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
top=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$top/dist}
case $out in /*) ;; *) out=$PWD/$out ;; esac
spec=$top/packaging/rpm/xenbackup.spec
version=$(rpmspec -q --srpm --qf '%{version}' "$spec" 2>/dev/null || sed -n 's/^Version: *//p' "$spec")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/SOURCES" "$work/xenbackup-$version" "$out"
tar -C "$top" --exclude=.git --exclude=./dist --exclude=./tests/vm/artifacts --exclude=__pycache__ \
    --exclude='*.egg-info' --exclude=./build -cf - . | tar -C "$work/xenbackup-$version" -xf -
tar -C "$work" -czf "$work/SOURCES/xenbackup-$version.tar.gz" "xenbackup-$version"
# --nodeps: a Debian build host has no RPM database to satisfy BuildRequires from.
rpmbuild -bb --nodeps --define "_topdir $work" "$spec" >"$work/build.log" 2>&1 || { tail -40 "$work/build.log"; exit 1; }
cp "$work"/RPMS/noarch/*.rpm "$out"/
ls "$out"/*.rpm
