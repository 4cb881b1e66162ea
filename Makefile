# Entry points; see README.md and tests/vm/README.md.
PYTHON ?= python3

.PHONY: deps deb rpm test test-unit test-vm test-fleet demo bench

# Host tools for the VM test bed (qemu, mmdebstrap, ...) and the project with its test extra.
deps:
	bash tests/vm/provision.sh

# The Debian package, into dist/: then `apt install ./dist/xenbackup_*.deb`.
deb:
	sh packaging/build-deb.sh dist

# The RPM (openSUSE, Fedora), into dist/; built and checked in CI, not install-tested.
rpm:
	sh packaging/rpm/build-rpm.sh dist

# Everything: unit tests and both VM flavours (a cold image cache adds a few minutes).
test: deps
	PYTHON=$(PYTHON) sh tests/run-all.sh

test-unit:
	$(PYTHON) -m pytest -ra -n auto tests/unit

test-vm:
	$(PYTHON) -m pytest -ra tests/vm

# The fleet suite alone (single-node Ceph RGW and an SFTP server, about 14 minutes).
test-fleet: deps
	$(PYTHON) -m pytest -ra tests/vm -k TestFleet

# Boot the xen flavour and run the demo inside, streaming its output.
demo: deps
	$(PYTHON) tests/vm/run-guest script --flavour xen tests/vm/demo/demo-in-guest.sh

# Time xenbackup against the bare recipe (same engine), borg and tar in one guest boot; see BENCHMARKS.md.
bench: deps
	sh bench/run
