# pyarraypool build, test and lint entry points (GNU make).
#
# A fresh clone needs nothing but `make test`: it creates .venv, installs the
# Python tools, builds pyarraypool._core in place and runs every test.

SHELL      := /bin/bash
PYTHON     ?= python3
VENV       := .venv
VPY        := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.pyarraypool-venv-stamp
PY_DEPS    := "numpy>=2.0" "setuptools>=64" wheel pytest hypothesis ruff mypy matplotlib
PIP        := $(VPY) -m pip --disable-pip-version-check

CXX        ?= g++
CORE_SRCS  := $(sort $(wildcard csrc/core/*.cpp))
CORE_HDRS  := $(sort $(wildcard csrc/core/*.hpp))
CSRC_FILES  = $(shell find csrc -name '*.cpp' -o -name '*.hpp' | sort)
TEST_FLAGS := -std=c++20 -O1 -g -UNDEBUG -Wall -Wextra -pthread -Icsrc
BENCH_FLAGS := -std=c++20 -O2 -DNDEBUG -pthread -Icsrc
BENCH_ARGS ?=
BENCH_PY_ARGS ?=
BENCH_E2E_ARGS ?=
BENCH_SCALE_ARGS ?=
ASAN_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined

# Use sudo for apt-get only when not already root.
SUDO       := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv install core-tests test demo bench bench-tools core-bench lint lint-tools format asan clean

# venv: create .venv (if absent) and install the build/test/lint tools; a stamp
# file makes it a no-op until this Makefile changes or `make clean` removes it.
venv: $(VENV_STAMP)

$(VENV_STAMP): Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --progress-bar off --upgrade pip setuptools wheel
	$(PIP) install --progress-bar off $(PY_DEPS)
	touch $@

# install: build pyarraypool._core in place (incremental) and put the repo root
# on the venv's sys.path with a .pth file, so `import pyarraypool` works from anywhere.
install: venv
	$(VPY) setup.py build_ext --inplace
	@site=$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  echo "$(CURDIR)" > "$$site/pyarraypool-src.pth"

# core-tests: build and run the standalone C++ tests of csrc/core (no Python).
core-tests: build/core_tests
	./build/core_tests

build/core_tests: csrc/tests/core_tests.cpp $(CORE_SRCS) $(CORE_HDRS)
	@mkdir -p build
	$(CXX) $(TEST_FLAGS) -o $@ csrc/tests/core_tests.cpp $(CORE_SRCS)

# test: the project's test command. Runs the C++ core tests and the pytest suite,
# then fails if they left new /dev/shm/pyarraypool-* entries behind.
test: install
	@before=$$(ls -1A /dev/shm | grep '^pyarraypool-' | sort); \
	status=0; \
	$(MAKE) --no-print-directory core-tests || status=$$?; \
	if [ $$status -eq 0 ]; then $(VPY) -m pytest -q tests || status=$$?; fi; \
	after=$$(ls -1A /dev/shm | grep '^pyarraypool-' | sort); \
	leaked=$$(comm -13 <(printf '%s\n' "$$before" | sed '/^$$/d') \
	                   <(printf '%s\n' "$$after" | sed '/^$$/d')); \
	if [ -n "$$leaked" ]; then \
	  echo "ERROR: the tests left these entries in /dev/shm:" >&2; \
	  printf '  /dev/shm/%s\n' $$leaked >&2; \
	  status=1; \
	fi; \
	exit $$status

# demo: run the example script against the in-place build.
demo: install
	$(VPY) examples/seed_example.py

# bench: the whole benchmark suite, then docs/benchmarks.md (and its plots) from
# the results in build/*.json: the C++ core benchmarks (core-bench; if they cannot
# be built or run, the report goes without them rather than with stale numbers),
# the per-array Python benchmark, the end-to-end benchmark through a
# multiprocessing Pool (with the SharedArray peer if `pip install SharedArray`
# works), then bench/report.py. A few minutes on 2 cores: run it on an idle
# machine. Options: BENCH_ARGS (core-bench), BENCH_PY_ARGS (bench_python.py),
# BENCH_E2E_ARGS (bench_e2e.py), BENCH_SCALE_ARGS (bench_scale.py: 10^6 live arrays,
# 32 processes, a 16 GiB pool; --skip-16g), e.g. BENCH_PY_ARGS=--quick BENCH_E2E_ARGS=--quick.
bench: install
	@mkdir -p build
	@$(MAKE) --no-print-directory core-bench || \
	  { echo "note: core-bench failed; the report has no C++ core section" >&2; rm -f build/core_bench.json; }
	@$(VPY) -c 'import SharedArray' 2>/dev/null || \
	  $(PIP) install --progress-bar off SharedArray >build/sharedarray-install.log 2>&1 || \
	  echo "note: SharedArray did not install (build/sharedarray-install.log); bench_e2e.py runs without it" >&2
	$(VPY) bench/bench_python.py --json build/bench_python.json $(BENCH_PY_ARGS)
	$(VPY) bench/bench_e2e.py --json build/bench_e2e.json $(BENCH_E2E_ARGS)
	$(VPY) bench/bench_scale.py --json build/bench_scale.json $(BENCH_SCALE_ARGS)
	$(VPY) bench/report.py

# bench-tools: apt-get install libbenchmark-dev (Google Benchmark) if its header
# is missing (apt-get update only when the package lists cannot provide it).
bench-tools:
	@if [ ! -f /usr/include/benchmark/benchmark.h ]; then \
	  echo "installing libbenchmark-dev"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(SUDO) apt-get install -y -q libbenchmark-dev </dev/null || \
	  { $(SUDO) apt-get update -q </dev/null && $(SUDO) apt-get install -y -q libbenchmark-dev </dev/null; }; \
	fi

# core-bench: build and run the C++ core benchmarks (Google Benchmark; no Python):
# medians of 5 repetitions to the terminal and to build/core_bench.json. Extra
# options go in BENCH_ARGS, e.g. BENCH_ARGS=--benchmark_filter=Lock. The binary
# fails if any pool it made is left in /dev/shm.
core-bench: bench-tools build/core_bench
	./build/core_bench --benchmark_out=build/core_bench.json --benchmark_out_format=json $(BENCH_ARGS)

# build/core_bench: the benchmark binary (bench-tools first, for the header).
build/core_bench: bench/core_bench.cpp $(CORE_SRCS) $(CORE_HDRS) | bench-tools
	@mkdir -p build
	$(CXX) $(BENCH_FLAGS) bench/core_bench.cpp $(CORE_SRCS) -lbenchmark -lpthread -o $@

# lint-tools: apt-get install clang-format and cppcheck if missing
# (apt-get update only when the package lists cannot provide them).
lint-tools:
	@missing=""; \
	command -v clang-format >/dev/null || missing="$$missing clang-format"; \
	command -v cppcheck >/dev/null || missing="$$missing cppcheck"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(SUDO) apt-get install -y -q $$missing </dev/null || \
	  { $(SUDO) apt-get update -q </dev/null && $(SUDO) apt-get install -y -q $$missing </dev/null; }; \
	fi

# lint: clang-format check, cppcheck on the C++ sources, ruff and mypy on the Python.
lint: lint-tools venv
	clang-format --dry-run --Werror $(CSRC_FILES)
	cppcheck --enable=warning,performance,portability --error-exitcode=1 --inline-suppr \
	  --std=c++20 -Icsrc csrc/core csrc/binding --suppress=missingIncludeSystem
	$(VENV)/bin/ruff check pyarraypool tests bench
	$(VENV)/bin/mypy pyarraypool

# format: reformat the C++ sources in place with clang-format.
format: lint-tools
	clang-format -i $(CSRC_FILES)

# asan: build the C++ core tests with AddressSanitizer + UBSan and run them.
asan: build/core_tests_asan
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  ./build/core_tests_asan

build/core_tests_asan: csrc/tests/core_tests.cpp $(CORE_SRCS) $(CORE_HDRS)
	@mkdir -p build
	$(CXX) $(TEST_FLAGS) $(ASAN_FLAGS) -o $@ csrc/tests/core_tests.cpp $(CORE_SRCS)

# clean: remove build outputs and the venv stamp (the venv itself is kept).
clean:
	rm -rf build
	rm -f pyarraypool/*.so
	rm -f $(VENV_STAMP)
