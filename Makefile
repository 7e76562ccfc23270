# memhp: `make run` runs the suite on the default kernel; `make test` tests memhp itself.
# Each target installs what is missing (Debian packages, the venv) and nothing else.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
KERNEL ?= debian:6.12
PYTEST_ARGS ?=
RESULTS := results
# Guests: qemu, busybox, dropbear, cpio/xz/zstd for images and modules.
# Kernel builds (debian-src:): compiler, kbuild tools, patch, git; ccache for bisect builds.
DEBS := qemu-system-x86 busybox-static dropbear-bin cpio xz-utils zstd tmux \
        gcc make bc flex bison libelf-dev libssl-dev patch git ccache python3-venv
# Reports: a headless Chromium loads the HTML report in its unit test.
DEBS += chromium-headless-shell

.PHONY: all deps venv run test unit integration bench clean
all: test

deps:
	@scripts/ensure-debs.sh $(DEBS)

$(VENV)/.installed: pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

run: deps venv
	$(VENV)/bin/memhp run --kernel $(KERNEL)

bench: deps venv
	$(VENV)/bin/memhp bench --kernel $(KERNEL)

unit: venv
	$(VENV)/bin/pytest tests/unit -q $(PYTEST_ARGS)

test: deps venv
	@mkdir -p $(RESULTS)
	$(VENV)/bin/pytest tests -ra --durations=15 --junitxml=$(RESULTS)/junit.xml $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(RESULTS) .pytest_cache
