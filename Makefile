# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Both create/reuse .venv, install requirements-dev.txt when it changes, and (re)build ktkernels._C
# incrementally with ninja. KTK_BUILD_CUDA=auto|0|1 controls the CUDA kernels (see setup.py).
# pip --no-compile: Python writes the bytecode of the modules that are imported when they first are, instead of
# pip compiling every file it installs (the install took 89 -> 44 s on 2 cores; benchmarks/NOTES.md, "CI time").
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-$(shell sha1sum requirements-dev.txt | cut -c1-12)
MAX_JOBS ?= $(shell nproc)
# pytest-xdist workers: the interpreter-bound tests split across cores (2 on the CI machine); 4 at most, so that
# a many-core box does not start a torch import per core. Work stealing keeps both CI workers busy to the end
# (a few tests take 30-80 s, and the default scheduling left one worker idle at the end). The slowest tests are
# listed at the end, to keep an eye on CI time.
TEST_JOBS ?= $(shell n=$$(nproc); echo $$(( n < 4 ? n : 4 )))

# The demo's table goes to build/ (ignored): benchmarks/results/ holds the committed runs it would overwrite.
DEMO_OUT ?= build/bench

.PHONY: demo test build lint clean

$(DEPS_STAMP): requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -r requirements-dev.txt
	rm -f $(VENV)/.deps-*
	touch $@

build: $(DEPS_STAMP)
	MAX_JOBS=$(MAX_JOBS) $(PY) setup.py -q build_ext --inplace

demo: build
	$(PY) -m ktkernels.train --demo
	$(PY) -m ktkernels.bench blurpool --out $(DEMO_OUT)

test: build
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist worksteal --durations=20

lint: $(DEPS_STAMP)
	$(PY) -m ruff check ktkernels tests benchmarks setup.py

clean:
	rm -rf build ktkernels/_C*.so
