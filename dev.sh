#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv on first use, reuses it after.
#   ./dev.sh serve [args]   start the cluster (router + prefill + decode) with the real SmolLM2 model
#   ./dev.sh test  [args]   run the whole test suite (first installs guidellm into .venv-guidellm, once)
#   ./dev.sh fast  [args]   the fast tier: unit and single-process tests (no cluster processes), about 2 min
#   ./dev.sh generate --prompt "..."   one offline completion
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY=${PYTHON:-python3}
STAMP=$VENV/.installed-$(cat pyproject.toml scripts/install.sh | sha1sum | cut -c1-12)

if [ ! -f "$STAMP" ]; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    bash scripts/install.sh "$VENV/bin/python"
    rm -f "$VENV"/.installed-* && touch "$STAMP"
fi
# Generated gRPC stubs are not in git: (re)generate them whenever the .proto is newer (e.g. after a pull).
if [ ! -f proto/disagg_pb2.py ] || [ proto/disagg.proto -nt proto/disagg_pb2.py ]; then
    bash scripts/gen_proto.sh "$VENV/bin/python"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

cmd=${1:-help}; shift || true
case "$cmd" in
    test)
        # guidellm (tests/test_api_guidellm.py) lives in its own virtualenv; that test fails if this did not work.
        if [ -z "${GUIDELLM:-}" ]; then
            bash scripts/install_guidellm.sh || echo "dev.sh: installing guidellm failed; test_api_guidellm will fail" >&2
            export GUIDELLM=$PWD/.venv-guidellm/bin/guidellm
        fi
        exec "$VENV/bin/python" -m pytest "$@" ;;
    fast) exec "$VENV/bin/python" -m pytest -m "not cluster and not slow" "$@" ;;
    serve) exec "$VENV/bin/disagg" serve "$@" ;;
    help|-h|--help) sed -n 2,7p "$0" ;;
    *) exec "$VENV/bin/disagg" "$cmd" "$@" ;;
esac
