#!/usr/bin/env bash
# Fresh machine -> working environment: system packages the pipeline needs, then .venv with the
# pinned Python stack. Called by `make setup` (and so by `make test` / `make demo`); safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# Python >= 3.11 (tomllib, the typing the config tree uses).
echo "setup: 1/6 Python: $("$PYTHON" --version 2>&1) ($(command -v "$PYTHON"))"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup: need Python >= 3.11, found $("$PYTHON" --version 2>&1)" >&2
    exit 1
fi

# A Java runtime: pycocoevalcap's PTB tokenizer and METEOR run on the JVM.
echo "setup: 2/6 Java runtime (pycocoevalcap's tokenizer and METEOR run on the JVM)"
if command -v java >/dev/null 2>&1; then
    echo "setup:   found: $(java -version 2>&1 | head -1)"
else
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup:   none found; installing a headless JRE (default-jre-headless) with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null
    else
        echo "setup: pycocoevalcap needs Java (a JRE >= 8); install one, e.g. 'apt-get install default-jre-headless'" >&2
        exit 1
    fi
fi

# Chromium, optional: infra/ui_check.py renders the MLflow UI headless. Without it that check (and
# tests/test_ui_check.py) skips, so failing to install it is a note, not an error.
echo "setup: 3/6 Chromium, optional (the headless MLflow UI check)"
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -n "$browser" ]; then
    echo "setup:   found: $browser"
else
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup:   none found; installing Debian's chromium with apt-get"
        if ! { apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
            echo "setup: note: could not install chromium; the MLflow UI check (tests/test_ui_check.py) will skip" >&2
        fi
    else
        echo "setup: note: no chromium on PATH and no root apt-get to install it; the MLflow UI check" \
            "(tests/test_ui_check.py) will skip. To run it: apt-get install chromium" >&2
    fi
fi

# PostgreSQL's server binaries, optional: `captioning stack up --db postgres` runs a local cluster with
# them (tests/test_postgres.py too). Without them SQLite stays the stack's database and those tests skip.
echo "setup: 4/6 PostgreSQL server binaries, optional (captioning stack up --db postgres)"
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if command -v initdb >/dev/null 2>&1 || [ -n "$pg_bin" ]; then
    echo "setup:   found: ${pg_bin:-$(dirname "$(command -v initdb)")}"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup:   none found; installing Debian's postgresql with apt-get (the stack runs its own cluster)"
    if ! { apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }; then
        echo "setup: note: could not install postgresql; --db postgres (and tests/test_postgres.py) unavailable" >&2
    fi
else
    echo "setup: note: no PostgreSQL server binaries and no root apt-get: --db postgres needs them" \
        "(apt-get install postgresql), or give an existing server's URL" >&2
fi

if [ -x "$VENV/bin/python" ]; then
    echo "setup: 5/6 virtual environment: $VENV (already there)"
else
    echo "setup: 5/6 virtual environment: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# The constraints file pins torch/torchvision together (a stray spec pulls GBs of CUDA packages).
# pip's own upgrade is skipped: the pinned stack installs with the pip that venv ships. Its whole
# output goes to a log; the terminal gets one line per package it fetches, then the count installed.
PIP_LOG="$VENV/pip-install.log"
echo "setup: 6/6 the pinned Python stack into $VENV (torch CPU, torchvision, Prefect, MLflow, pycocoevalcap," \
    "WebDataset, ...; a few minutes the first time; log: $PIP_LOG)"
set +o pipefail
"$VENV/bin/python" -m pip install --progress-bar off -c constraints.txt -e '.[dev]' 2>&1 | tee "$PIP_LOG" | awk '
    /^Collecting / { sub(/^Collecting /, ""); sub(/ \(from .*$/, ""); print "setup:   fetching " $0; fflush(); next }
    /^Installing collected packages: / { n = split(substr($0, 32), names, ", "); print "setup:   installing " n " packages"; fflush(); next }
    /^Successfully installed / { print "setup:   installed " (NF - 2) " packages"; fflush(); next }
'
pip_rc=${PIPESTATUS[0]}
set -o pipefail
if [ "$pip_rc" != 0 ]; then
    # The registry mirrors here print one "Location ... is ignored" line per package: left out.
    grep -v "^WARNING: Location '.*' is ignored" "$PIP_LOG" | tail -25 >&2
    echo "setup: pip install failed (exit $pip_rc); its whole output: $PIP_LOG" >&2
    exit "$pip_rc"
fi

# Fail set-up, not the first test, when the stack does not import (torchvision through our shim).
"$VENV/bin/python" - <<'PY'
import torch

from captioning.vision import import_torchvision

tv = import_torchvision()
print(f"setup: ready: torch {torch.__version__}, torchvision {tv.__version__}")
PY
