# Everything installs from nothing into .venv. torch first (the pinned CPU build on disk: an
# unpinned torch would pull a multi-GB CUDA build), then faiss for this host, then the package
# with its `test`, `ray` and `onnx` extras (optional for users; installed here so their tests run).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Ray binds to the machine's own address; the tests run in a loopback-only network namespace.
NETNS  := $(shell unshare -n true 2>/dev/null && echo yes)

.PHONY: install test lint demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	if nvidia-smi -L >/dev/null 2>&1; then $(PIP) install -q faiss-gpu || $(PIP) install -q faiss-cpu; \
	else $(PIP) install -q faiss-cpu; fi
	$(PIP) install -q -e '.[test,ray,onnx]'
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check .

test: install lint
ifeq ($(NETNS),yes)
	unshare -n sh -c 'ip link set lo up; $(VENV)/bin/pytest -q $(PYTEST_ARGS)'
else
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)
endif

demo: install
	$(VENV)/bin/geosurge demo

clean:
	rm -rf $(VENV) .pytest_cache demo-out
