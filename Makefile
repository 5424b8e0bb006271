# The two commands: `make demo` and `make test`. Each sets up everything it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
XENKIT := tools/xen-vm

.PHONY: demo test test-xen test-xen-domu test-xen-all bench-xen lint bench install clean stress

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

# Reinstall when the build inputs change; the package itself is installed editable.
$(STAMP): $(PY) pyproject.toml setup.py src/gntipc/_native/_build.py src/gntipc/_native/_cdefs.h src/gntipc/_native/_src.c
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -m "not xen" -q

# Real Xen 4.17 under QEMU: the xen-marked tests with the xen backend, in dom0.  Code runs
# 10-20x slower under emulation, so CI runs a subset (XEN_TESTS); `make test-xen-all` runs
# every xen-marked test (stream conformance, sessions, message queues too: ~25 min).
# The dom0<->domU tests are in it: they failed now and then (a dom0 heap page written
# behind our back) until the kit's guest CPU became qemu64 (see tools/xen-vm/README.md).
XEN_TESTS ?= tests/native tests/xenstore tests/backends tests/channel tests/interop \
	tests/streams/test_crossproc.py tests/streams/test_listener.py
XEN_PYTEST = GNTIPC_BACKEND=xen $(CURDIR)/$(PY) -m pytest -m xen -v --timeout=240 --durations=20

test-xen: $(STAMP)
	$(XENKIT)/run-in-xen.sh --timeout 2700 "$(CURDIR)" '$(XEN_PYTEST) $(XEN_TESTS)'

test-xen-domu: $(STAMP)
	$(XENKIT)/run-in-xen.sh --timeout 1500 "$(CURDIR)" '$(XEN_PYTEST) tests/interop/test_domu.py'

test-xen-all: $(STAMP)
	$(XENKIT)/run-in-xen.sh --timeout 3600 "$(CURDIR)" '$(XEN_PYTEST) tests'

bench-xen: $(STAMP)
	$(XENKIT)/run-in-xen.sh --timeout 900 "$(CURDIR)" '$(CURDIR)/$(PY) benchmarks/xen_vs_libxenvchan.py'

# Every figure is also saved to benchmarks/results/<UTC timestamp>.json and drawn into <timestamp>.png.
# `make bench BENCH_ARGS="--quick --only latency"` passes options through.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) benchmarks/run.py $(BENCH_ARGS)
	$(if $(findstring --no-save,$(BENCH_ARGS)),,$(PY) benchmarks/plot.py)

# The user guide and API reference (docs/, mkdocs.yml) into site/, offline, warnings as
# errors.  Only this target installs the docs extra (make test does not need mkdocs).
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[docs]'
	touch $(DOCS_STAMP)

.PHONY: docs
docs: $(DOCS_STAMP)
	$(PY) -m mkdocs build --strict

# The long stress runs of tests/stress (make test runs short versions): SIGKILL chaos,
# a hostile peer fuzzing the shared pages (C core under AddressSanitizer), a leak soak
# and exhaustion.  Prints a table of counts; fails on any failed count.
# STRESS=medium for a shorter run; GNTIPC_STRESS_ASAN=0 without AddressSanitizer.
STRESS ?= full
stress: $(STAMP)
	GNTIPC_STRESS=$(STRESS) $(PY) -m pytest -m "not xen" -q -rxX tests/stress

clean:
	rm -rf build src/*.egg-info src/gntipc/_native/_lib*.so src/gntipc/_native/_lib.c
