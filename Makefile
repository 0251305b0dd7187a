# The two commands of the README: `make bench` and `make test`. Both install first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PKGS := etcd-server etcd-client iperf3 iptables nftables iproute2 iputils-ping gcc systemd ethtool linux-perf
ENGINE_SO = $(wildcard fastlane/_engine*.so)

.PHONY: install apt venv build test lint bench clean clang sanitize asan asan-engine asan-stress tsan fuzz

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

# both engine modules: the shipped fastlane._engine and the tests' tests._engine_test (build.py)
build: venv
	rm -f fastlane/_engine*.so tests/_engine_test*.so
	$(PY) build.py

test: install lint
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(MAKE) --no-print-directory sanitize FUZZ_SECS=$(TEST_FUZZ_SECS)

# Static checks (configured in pyproject.toml): lint, formatting, types.
LINT_PATHS := fastlane tests csrc build.py setup.py
lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

bench: install
	$(VENV)/bin/fastlane bench --quick

clean:
	rm -rf build fastlane/_engine*.so fastlane/_engine.c tests/_engine_test*.so tests/_engine_test.c *.egg-info

# ---- Sanitizers and fuzzing (csrc/README.md, "Sanitizers and fuzzing") ----
# Everything builds under build/{asan,san,fuzz}; the in-place fastlane/_engine*.so is never touched.
# CSRC=dir points the stress program and the fuzz harnesses at other engine sources.
CSRC ?= csrc
CLANG := clang
CLANG_PKGS := clang
ASAN_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
TSAN_FLAGS := -fsanitize=thread
SAN_CFLAGS := -O1 -g -pthread -Wall -Wextra -Wno-unused-parameter -U_FORTIFY_SOURCE
ASAN_TESTS ?= tests/test_packet.py tests/test_engine_traffic.py
STRESS_SECS ?= 6
FUZZ_SECS ?= 30
TEST_FUZZ_SECS ?= 20
SAN_DIR ?= build/san
FUZZ_DIR ?= build/fuzz
ENGINE_SRCS = $(wildcard $(CSRC)/*.c)
# the files that make syscalls: a harness that fakes them #includes these instead of linking them
IO_SRCS = $(addprefix $(CSRC)/,engine.c tun_batch.c udp_batch.c)
ENGINE_HDRS = $(wildcard $(CSRC)/*.h)
# the inner source check's config fields exist only in newer sources
STRESS_DEFS = $(shell grep -q network_len $(CSRC)/engine_cdef.h && echo -DSTRESS_INNER_CHECK)
FUZZERS := fuzz_packet fuzz_rounds

sanitize: asan tsan fuzz

# Debian's clang (its compiler-rt runtimes included); apt-get only when missing, as `apt` does.
clang:
	@dpkg -s $(CLANG_PKGS) >/dev/null 2>&1 || { \
		echo "installing: $(CLANG_PKGS)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CLANG_PKGS); }

asan: asan-engine asan-stress

# The cffi module built with ASan+UBSan into build/asan, and the engine's tests run against it.
# The ASan runtime must be the first library loaded, hence LD_PRELOAD; CPython itself leaks at
# exit, hence detect_leaks=0. run_sanitized.py fails unless the sanitized module is the one loaded.
asan-engine: clang
	@test -x $(PY) || { echo "no $(PY): run make venv first"; exit 1; }
	$(PY) build.py --out build/asan --cc $(CLANG) --cflags "$(ASAN_FLAGS) -O1"
	ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	LD_PRELOAD=$$($(CLANG) -print-file-name=libclang_rt.asan-x86_64.so) \
		$(PY) csrc/tests/run_sanitized.py build/asan -q -p no:cacheprovider $(ASAN_TESTS)

# The threaded stress program (csrc/tests/stress.c): route swaps during traffic, both ways.
# The files that make syscalls get stress_hooks.h force-included (fake TUN ioctls, injected EAGAIN).
$(SAN_DIR)/stress-%: csrc/tests/stress.c csrc/tests/stress_hooks.h $(ENGINE_SRCS) $(ENGINE_HDRS) | clang
	@mkdir -p $(SAN_DIR)
	flags="$(if $(filter tsan,$*),$(TSAN_FLAGS),$(ASAN_FLAGS))"; objs=""; \
	for src in $(IO_SRCS); do \
		obj=$@-$$(basename $$src .c).o; objs="$$objs $$obj"; \
		$(CLANG) $(SAN_CFLAGS) $$flags -I$(CSRC) -include csrc/tests/stress_hooks.h \
			-c $$src -o $$obj || exit 1; \
	done; \
	$(CLANG) $(SAN_CFLAGS) $$flags $(STRESS_DEFS) -I$(CSRC) csrc/tests/stress.c \
		$(filter-out $(IO_SRCS),$(ENGINE_SRCS)) $$objs -o $@

asan-stress: $(SAN_DIR)/stress-asan
	timeout 120 $< $(STRESS_SECS)

# clang 14's TSan maps its shadow at fixed addresses; with high mmap ASLR entropy
# (vm.mmap_rnd_bits > 28, as on newer kernels) the program can land on them and die with
# "unexpected memory mapping". setarch -R runs it without address randomisation, which avoids it.
tsan: $(SAN_DIR)/stress-tsan
	timeout 180 setarch "$$(uname -m)" -R $< $(STRESS_SECS)

# libFuzzer harnesses (csrc/fuzz/), each run for FUZZ_SECS from a copy of its committed seed corpus
# (csrc/fuzz/corpus/<name>, made by csrc/fuzz/make_corpus.py) in a temp dir, crash artifacts there
# too; a crash fails the target and prints the artifact's path and bytes.
$(FUZZ_DIR)/%: csrc/fuzz/%.c csrc/fuzz/fuzz_common.h $(ENGINE_SRCS) $(ENGINE_HDRS) | clang
	@mkdir -p $(FUZZ_DIR)
	$(CLANG) $(SAN_CFLAGS) -fsanitize=fuzzer,address,undefined -fno-omit-frame-pointer \
		-fno-sanitize-recover=undefined -I$(CSRC) -Icsrc/fuzz $< \
		$(if $(shell grep -l '^#include "engine.c"' $<),$(filter-out $(IO_SRCS),$(ENGINE_SRCS)),$(ENGINE_SRCS)) \
		-o $@

fuzz: $(addprefix $(FUZZ_DIR)/,$(FUZZERS))
	@tmp=$$(mktemp -d /tmp/fastlane-fuzz.XXXXXX); trap 'rm -rf "$$tmp"' EXIT; rc=0; \
	for f in $(FUZZERS); do \
		mkdir -p "$$tmp/$$f/corpus" "$$tmp/$$f/artifacts"; \
		cp csrc/fuzz/corpus/$$f/* "$$tmp/$$f/corpus/"; \
		echo "fuzz: $$f for $(FUZZ_SECS)s"; \
		if ! $(FUZZ_DIR)/$$f -max_total_time=$(FUZZ_SECS) -timeout=10 -rss_limit_mb=2048 \
			-print_final_stats=1 -artifact_prefix="$$tmp/$$f/artifacts/" \
			"$$tmp/$$f/corpus" >"$$tmp/$$f/log" 2>&1; then \
			rc=1; tail -n 60 "$$tmp/$$f/log"; \
			for a in "$$tmp/$$f"/artifacts/*; do \
				[ -e "$$a" ] || continue; \
				keep=$$(mktemp /tmp/fastlane-$$f-crash.XXXXXX); cp "$$a" "$$keep"; \
				echo "fuzz: $$f crashed; reproducer kept at $$keep (run: $(FUZZ_DIR)/$$f $$keep)"; \
				od -A d -t x1 "$$keep" | head -n 40; \
			done; \
		else grep -E '^(stat::number_of_executed_units|stat::new_units_added|Done)' "$$tmp/$$f/log" || true; fi; \
	done; exit $$rc
