#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, integration tests included: they start the real broker
# (tansu) and a real Redis on free loopback ports themselves and stop them afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q --durations=15 "$@"
