# Two commands on a fresh machine: `make simulate` (main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv nginx simulate test test-slow lint typecheck bench lock clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU build on disk (an unpinned torch pulls CUDA).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) nginx

# flower-server puts nginx in front of its SuperLink (only the Fleet API is public; see
# deploy/README.md). Installed here when missing on Debian/Ubuntu as root; elsewhere the
# message says what to install (flower-server refuses a public --host without it).
nginx:
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing nginx (flower-server's fleet proxy)"; \
	    apt-get update -qq && { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null 2>&1 \
	      || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null; }; \
	  else \
	    echo "nginx is missing: install it (Debian: apt-get install nginx-light); the proxy tests need it" >&2; \
	  fi; }

simulate: $(STAMP) nginx
	$(BIN)/flower-simulation run

test: $(STAMP) nginx
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q

test-slow: $(STAMP) nginx
	$(BIN)/pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench

# The image's hashed lock file (deploy/README.md, "The lock file"): resolve the project's
# dependencies with the CPU torch, keep each file's SHA-256.
lock: $(STAMP)
	$(BIN)/pip install -q --dry-run --ignore-installed --report $(VENV)/lock-report.json torch==2.13.0 . 'setuptools>=68' wheel
	$(BIN)/python deploy/make_lock.py $(VENV)/lock-report.json requirements.lock

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache *.egg-info
