# The two commands: `make demo` and `make test`. Each sets up everything it needs.
# `make test PYVER=3.12` does the same in .venv-3.12 with that Python (python3.12 on the
# PATH, else pyenv's); `make test-versions` runs the suite under each of PYVERS.
PYVER  ?=
PYVERS ?= 3.12 3.13
ifeq ($(PYVER),)
PYTHON ?= python3
VENV   ?= .venv
else
PYTHON ?= $(or $(shell for p in python$(PYVER) "$$(pyenv root 2>/dev/null)"/versions/$(PYVER)*/bin/python$(PYVER); do "$$p" -c '' 2>/dev/null && { echo "$$p"; break; }; done),python$(PYVER))
VENV   ?= .venv-$(PYVER)
endif
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
XENKIT := tools/xen-vm

.PHONY: demo test test-xen test-xen-all test-xen-suite test-xen-domu test-xen-dmabuf bench-xen lint bench install clean stress

# The venv ignores itself (as 3.13's venv does), so that git ignores .venv-3.12 too.
$(PY):
	$(PYTHON) -m venv $(VENV)
	echo '*' > $(VENV)/.gitignore
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

SUITE = $(PY) -m pytest -m "not xen" -q

test: lint
	$(SUITE)

# The suite under the other supported Pythons, each in its own venv (.venv-3.12, ...);
# without lint, which would say the same of the same code.
.PHONY: test-versions test-suite
test-versions:
	set -e; for v in $(PYVERS); do $(MAKE) --no-print-directory test-suite PYVER=$$v; done

test-suite: $(STAMP)
	$(SUITE)

# Real Xen 4.17 under QEMU (tools/xen-vm): every xen-marked test under asyncio (and trio in
# the modules about the event loop and the devices, tests/conftest.py TRIO_ON_XEN),
# with the xen backend in dom0 (dom0<->dom0, and dom0<->domU with real PV guests), on the
# stock xen_gntdev; then the dma-buf tests on a xen_gntdev built with
# CONFIG_XEN_GNTDEV_DMABUF (tools/xen-vm/build-gntdev-dmabuf.sh; Debian's kernel has it
# off).  Code runs 10-20x slower under emulation: ~35 min in all on 2 cores.
XEN_TESTS ?= tests
XEN_PYTEST = GNTIPC_BACKEND=xen $(CURDIR)/$(PY) -m pytest -m xen -v --timeout=240 --durations=20

test-xen: test-xen-suite test-xen-dmabuf

test-xen-all: test-xen  # its old name (it ran the whole suite when CI ran a subset)

test-xen-suite: $(STAMP)
	$(XENKIT)/run-in-xen.sh --timeout 4200 "$(CURDIR)" '$(XEN_PYTEST) $(XEN_TESTS)'

test-xen-domu: $(STAMP)
	$(XENKIT)/run-in-xen.sh --timeout 1800 "$(CURDIR)" \
		'$(XEN_PYTEST) tests/interop/test_domu.py tests/interop/test_domu_conformance.py'

test-xen-dmabuf: $(STAMP)
	KO=$$($(XENKIT)/build-gntdev-dmabuf.sh) && \
	$(XENKIT)/run-in-xen.sh --timeout 1200 "$(CURDIR)" "$(XENKIT)/build-gntdev-dmabuf.sh --load $$KO && \
		$(XEN_PYTEST) tests/native/test_dmabuf.py tests/native/test_devices_xen.py"

# gntipc against libxenvchan C in dom0 with one vCPU, then with two (BENCH_XEN_SMP).
BENCH_XEN_SMP ?= 1 2
bench-xen: $(STAMP)
	set -e; for n in $(BENCH_XEN_SMP); do \
		$(XENKIT)/run-in-xen.sh --smp $$n --timeout 900 "$(CURDIR)" \
			'$(CURDIR)/$(PY) benchmarks/xen_vs_libxenvchan.py'; \
	done

# Map vs copy in dom0 (#22): the ring, the bulk pool, map/unmap per payload, grant copy.
# `make bench-xen-bulk BENCH_XEN_BULK_ARGS="--mib 1024 --repeat 3"` passes options through.
.PHONY: bench-xen-bulk
BENCH_XEN_BULK_ARGS ?=
bench-xen-bulk: $(STAMP)
	$(XENKIT)/run-in-xen.sh --timeout 1500 "$(CURDIR)" \
		'$(CURDIR)/$(PY) benchmarks/xen_bulk.py $(BENCH_XEN_BULK_ARGS)'

# dom0 <-> domU (#19, #22): one side of every transfer in a PV domU of one vCPU, both
# directions in turn; the two scripts' options pass through, e.g.
# `make bench-xen-domu BENCH_XEN_DOMU_ARGS="--mib 16 --api async"`.
.PHONY: bench-xen-domu bench-xen-bulk-domu
BENCH_XEN_DOMU_ARGS ?=
bench-xen-domu: $(STAMP)
	$(XENKIT)/run-in-xen.sh --timeout 2400 "$(CURDIR)" \
		'$(CURDIR)/$(PY) benchmarks/xen_vs_libxenvchan.py --domu $(BENCH_XEN_DOMU_ARGS)'
bench-xen-bulk-domu: $(STAMP)
	$(XENKIT)/run-in-xen.sh --timeout 2400 "$(CURDIR)" \
		'$(CURDIR)/$(PY) benchmarks/xen_bulk.py --domu $(BENCH_XEN_BULK_ARGS)'

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
