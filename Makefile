# `make demo` and `make test` install everything themselves (into .venv) the first time.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench clean constraints

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[all,dev]"
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "warning: could not install Debian's chromium (needed by tests/test_demo_page.py)"
	(command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1) \
		|| (apt-get update -qq && apt-get install -y -qq postgresql) \
		|| echo "warning: could not install Debian's postgresql (the gallery store's PostgreSQL tests need it)"
	command -v cc >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq gcc) \
		|| echo "warning: could not install gcc (tests/test_gallery_store.py builds an fsync-failing shim with it)"
	command -v ip >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq iproute2) \
		|| echo "warning: could not install iproute2 (tests/test_cluster.py puts Ray nodes in network namespaces)"
	touch $(STAMP)

demo: install
	$(VENV)/bin/cman quickstart

test: install
	RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider --timeout 900

lint: install
	$(VENV)/bin/ruff check cman jobs tuning serve_app bench tests
	$(VENV)/bin/ruff format --check cman jobs tuning serve_app bench tests
	$(PY) tools/check_structure.py   # import circles, private names of other packages, functions over 60 lines

clean:
	rm -rf $(VENV) outputs .pytest_cache

constraints: install   # rewrite constraints.txt from .venv (after a deliberate upgrade; CI tests that set)
	head -2 constraints.txt > constraints.new
	$(PY) -m pip freeze --exclude-editable | grep -v '^cman\|^-e\|@ file' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/' >> constraints.new
	mv constraints.new constraints.txt
