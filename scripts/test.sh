#!/usr/bin/env bash
# Set up (if needed), lint (ruff), type-check (mypy) and run the whole test suite, integration tests included:
# they start the real broker (tansu) and a real Redis on free loopback ports themselves and stop them afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The status-page test drives Debian's headless Chromium; install it where we may (root with apt), else that
# one test skips and says why.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium could not be installed: tests/ops/test_status_page.py will skip"
fi
# Lint and types first: either failing fails the command before the (long) suite starts.
.venv/bin/ruff check model connectors pipeline tests
.venv/bin/mypy  # model/ connectors/ pipeline/, configured in pyproject.toml
# Two pytest-xdist workers where there are two cores or more: the integration tests mostly wait on their broker,
# Redis and service processes, so a second worker fills those waits (each worker and every process it starts
# computes on one torch thread: tests/conftest.py). On this project's 2-core machine: 855 s against 1,418 s.
WORKERS=$(( $(nproc) >= 2 ? 2 : 1 ))
exec .venv/bin/python -m pytest -q -n "$WORKERS" --durations=15 "$@"
