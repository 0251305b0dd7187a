# The two commands of the README: `make bench` and `make test`. Both install first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PKGS := etcd-server etcd-client iperf3 iptables iproute2 iputils-ping gcc
ENGINE_SO = $(wildcard fastlane/_engine*.so)

.PHONY: install apt venv build test bench clean

install: apt venv build

# apt-get only what is missing, so a second run is quick and offline-safe.
apt:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

build: venv
	rm -f fastlane/_engine*.so
	$(PY) build.py

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/fastlane bench --quick

clean:
	rm -rf build fastlane/_engine*.so fastlane/_engine.c *.egg-info
