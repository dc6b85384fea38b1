# Everything installs from nothing into .venv. torch first (the pinned CPU build on disk: an
# unpinned torch would pull a multi-GB CUDA build), then faiss for this host, then the package
# with its `test`, `ray`, `heif` and `onnx` extras (optional for users; installed here so their tests run),
# and the oldest DuckDB that opens an index's cells.duckdb, in a folder of its own that only the
# test of that promise puts on its PYTHONPATH (tests/test_outputs.py). Two Debian packages the
# photo-archive tests use, installed by `make test` when missing (CI starts from nothing and runs
# as root; `make demo` does not need them):
# exiftool reads the XMP sidecars back (tests/test_sidecars.py), headless Chromium renders the
# review page (tests/test_review.py).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
OLD_DUCKDB := 0.10.3
# Ray binds to the machine's own address; the tests run in a loopback-only network namespace.
NETNS  := $(shell unshare -n true 2>/dev/null && echo yes)

.PHONY: install system-tools test lint demo gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	if nvidia-smi -L >/dev/null 2>&1; then $(PIP) install -q faiss-gpu || $(PIP) install -q faiss-cpu; \
	else $(PIP) install -q faiss-cpu; fi
	$(PIP) install -q -e '.[test,ray,heif,onnx]'
	# GeoCLIP's wheel (`geosurge import geoclip` reads its weights and gallery; the tests compare with
	# it). --no-deps: it declares torchvision, which would replace the pinned torch and which its
	# model code never imports; its other dependencies are already installed above.
	$(PIP) install -q --no-deps geoclip==1.3.0
	$(PIP) install -q --no-warn-conflicts --upgrade --target $(VENV)/old-duckdb duckdb==$(OLD_DUCKDB)
	touch $(STAMP)

# exiftool (libimage-exiftool-perl) and chromium, from Debian, only when missing
system-tools:
	@missing=""; \
	command -v exiftool >/dev/null 2>&1 || missing="$$missing libimage-exiftool-perl"; \
	command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

lint: install
	$(VENV)/bin/ruff check .

test: install system-tools lint
ifeq ($(NETNS),yes)
	unshare -n sh -c 'ip link set lo up; $(VENV)/bin/pytest -q $(PYTEST_ARGS)'
else
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)
endif

demo: install
	$(VENV)/bin/geosurge demo

# Every GPU path once on small sizes (< 10 min on one GPU): what passed, images/s, % of bf16 peak.
# Runs minus CUDA on a CPU-only machine too.
gpu-check: install
	$(VENV)/bin/geosurge bench gpu $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache demo-out
