#!/bin/bash
# Install what the tests need on a Debian 12 host (as root): the VM test
# bed's host tools from Debian, then the project with its test extra.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
export DEBIAN_FRONTEND=noninteractive

# qemu (TCG) boots the guest; qemu-utils makes its overlays; mmdebstrap
# builds the image, mkfs.ext4 -d packs it; the rest are host-side helpers.
packages=(qemu-system-x86 qemu-utils mmdebstrap debian-archive-keyring gpg mount e2fsprogs xfsprogs busybox-static
    make
    # unit tests: real restic, systemd-analyze for calendars, pystemd's build (PyPI ships an sdist only),
    # and the Debian package build
    restic systemd libsystemd-dev pkg-config gcc util-linux
    # the thin-incremental segment filesystem, tested against real restic over FUSE
    python3-pyfuse3 fuse3 thin-provisioning-tools
    debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools dpkg-dev fakeroot
    # the package checks: lintian on the .deb; rpmbuild and rpm -q for the RPM spec (built, not installed)
    lintian rpm python3-pip python3-wheel)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null | grep -qx installed || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "provision: installing ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "provision: installing python3-pip"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3-pip python3-venv
fi

if [ -f pyproject.toml ]; then
    pip_args=(--quiet --disable-pip-version-check --root-user-action=ignore)
    # Debian's own python3 refuses pip installs unless told (PEP 668).
    if python3 -c 'import sys, sysconfig, pathlib; sys.exit(not pathlib.Path(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED").exists())'; then
        pip_args+=(--break-system-packages)
    fi
    echo "provision: python3 -m pip install -e '.[test]'"
    python3 -m pip install "${pip_args[@]}" -e '.[test]'
else
    echo "provision: no pyproject.toml yet; installing pytest only"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore pytest
fi
