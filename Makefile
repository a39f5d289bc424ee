# snapfs: `make run` mounts a demo, `make test` runs everything. Both install what they
# need on a fresh Debian machine (as root): system packages with apt-get, Python packages
# into .venv.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SNAPFS := $(VENV)/bin/snapfs
DEMO ?= /var/tmp/snapfs-demo
SYSTEM_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3 python3-dev python3-venv \
                   fio rsync attr acl git sqlite3 tar

.PHONY: run test deps system-deps lint bench demo-umount clean

system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@[ -e /dev/fuse ] || (modprobe fuse 2>/dev/null || true)

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

deps: system-deps $(VENV)/.installed

lint: deps
	$(VENV)/bin/ruff check snapfs tools tests

test: deps
	$(VENV)/bin/ruff check snapfs tools tests
	$(PY) -m pytest -q -p no:cacheprovider tests
	@echo "--- the mounted POSIX suite again, on an encrypted repository"
	SNAPFS_TEST_ENCRYPT=1 $(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests/fuse \
	    --ignore=tests/fuse/test_mnt_exchange.py --ignore=tests/fuse/test_mnt_encryption.py
	$(PY) tools/bench --smoke

run: deps
	@mkdir -p $(DEMO)
	@if mountpoint -q $(DEMO)/mnt; then $(SNAPFS) umount $(DEMO)/mnt; fi
	@[ -f $(DEMO)/repo/snapfs.json ] || $(SNAPFS) init $(DEMO)/repo
	@mkdir -p $(DEMO)/mnt
	$(SNAPFS) mount $(DEMO)/repo $(DEMO)/mnt
	@$(PY) tools/demo.py $(DEMO)

bench: deps
	$(PY) tools/bench

demo-umount:
	-$(SNAPFS) umount $(DEMO)/mnt

clean:
	rm -rf $(VENV) build *.egg-info
