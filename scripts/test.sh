#!/usr/bin/env bash
# Set up the test environment (once; reused while pyproject.toml is unchanged) and run the whole test suite.
#   bash scripts/test.sh              # everything
#   bash scripts/test.sh -k weights   # extra arguments go to pytest
# The environment lives outside the repository (FLAXVISION_TEST_VENV, default ~/.cache/flaxvision/test-venv)
# because the reference implementations (torch, transformers, timm) are large and slow to install.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "flaxvision needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
  exit 2
fi

venv=${FLAXVISION_TEST_VENV:-$HOME/.cache/flaxvision/test-venv}
stamp="$venv/.flaxvision-deps"
# Rebuilt when the Python or the dependency lists change (not for edits to the tools' settings further down).
want="$("$python" --version 2>&1) $(sed -n '/^dependencies/,/^\[project.scripts\]/p' pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== setting up the test environment in $venv (first run only)"
  start=$SECONDS
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e '.[test]'
  echo "$want" > "$stamp"
  echo "== environment ready in $((SECONDS - start)) s"
else
  # Same dependencies: only point the editable install at this checkout.
  "$venv/bin/python" -m pip install --quiet --no-deps -e .
fi

# The browser tests open the report and compare pages in Debian's Chromium (driven by playwright from the test
# extra). Installed here where this runs as root with apt; elsewhere those tests skip and say why.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "== installing Debian's chromium for the browser tests (first run only)"
  log=${TMPDIR:-/tmp}/flaxvision-chromium-install.log
  if ! (timeout 600 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq \
        --no-install-recommends chromium) >"$log" 2>&1; then
    echo "chromium could not be installed (see $log): the browser tests will skip"
  fi
fi

# Lint (ruff: pycodestyle, pyflakes, import order, bugbear, pyupgrade) and type-check (pyright, basic) first: a
# finding fails the run before the tests start. FLAXVISION_SKIP_LINT=1 skips both (e.g. while iterating on a test).
if [ "${FLAXVISION_SKIP_LINT:-0}" != 1 ]; then
  echo "== ruff"
  "$venv/bin/ruff" check --quiet src tests benchmarks
  echo "== pyright"
  if ! report=$("$venv/bin/pyright" --pythonpath "$venv/bin/python" 2>&1); then
    echo "$report"
    exit 1
  fi
  echo "$report" | tail -n 1
fi

# Two workers for two cores; whole files per worker so module fixtures (the default run) run once.
exec "$venv/bin/python" -m pytest -n 2 --dist loadfile "$@"
