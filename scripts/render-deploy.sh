#!/usr/bin/env bash
# Render the Helm chart offline with Helm's own template engine (helm-python-sdk, pinned in the `test` extra;
# scripts/setup.sh installs it). No helm binary, no cluster.
#
#   scripts/render-deploy.sh                    # chart defaults (GPU, model baked in the image)
#   scripts/render-deploy.sh prod               # deploy/helm/sinkstream/ci/prod-values.yaml
#   scripts/render-deploy.sh my-values.yaml     # any values file
#   scripts/render-deploy.sh all OUTDIR         # every ci/*-values.yaml variant into OUTDIR/<variant>.yaml
#
# Extra arguments go to scripts/render_chart.py (--release, --namespace, -o). Exits 1 with Helm's message
# when the values are refused (values.schema.json, or a `fail` in the templates).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CI=deploy/helm/sinkstream/ci
case "${1:-}" in
  "")
    exec "$PY" scripts/render_chart.py ;;
  all)
    out=${2:?usage: render-deploy.sh all OUTDIR}
    mkdir -p "$out"
    "$PY" scripts/render_chart.py -o "$out/default.yaml"
    for f in "$CI"/*-values.yaml; do
      v=$(basename "$f" -values.yaml)
      "$PY" scripts/render_chart.py -f "$f" -o "$out/$v.yaml"
    done
    ls "$out" ;;
  *)
    if [ -f "$1" ]; then f=$1; else f="$CI/$1-values.yaml"; fi
    shift
    exec "$PY" scripts/render_chart.py -f "$f" "$@" ;;
esac
