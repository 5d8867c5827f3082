#!/usr/bin/env bash
# guidellm 0.8.1 (the vLLM project's load generator; tests/test_api_guidellm.py drives a cluster with it) in its own
# virtualenv, .venv-guidellm: it pins click~=8.4 (the main environment has a newer one, for ray and uvicorn) and
# pulls datasets, pandas, pyarrow and sanic, none of which the cluster needs. Created on first use, reused after
# (stamp, as in dev.sh). The CPU torch goes in first: guidellm requires torch, and an unpinned one would pull a
# multi-GB CUDA build. Prints nothing when the environment is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-guidellm
PY=${PYTHON:-python3}
STAMP=$VENV/.installed-$(sha1sum scripts/install_guidellm.sh | cut -c1-12)

if [ ! -f "$STAMP" ]; then
    echo "installing guidellm 0.8.1 into $VENV (once)" >&2
    start=$SECONDS
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q "guidellm==0.8.1"
    "$VENV/bin/guidellm" --version >/dev/null
    rm -f "$VENV"/.installed-* && touch "$STAMP"
    echo "guidellm installed in $((SECONDS - start)) s" >&2
fi
