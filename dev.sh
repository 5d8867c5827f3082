#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv on first use, reuses it after.
#   ./dev.sh serve [args]   start the cluster (router + prefill + decode) with the real SmolLM2 model
#   ./dev.sh test  [args]   run the whole test suite (first installs guidellm into .venv-guidellm, once)
#   ./dev.sh fast  [args]   the fast tier: unit and single-process tests (no cluster processes), a few minutes
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
        if [ $# -gt 0 ]; then exec "$VENV/bin/python" -m pytest "$@"; fi
        # The whole suite in two runs: the fast tier spread over the cores, then the cluster and slow tests one at
        # a time (they start processes of their own and some time what those do). Both run; either failing fails.
        rc=0
        bash ./dev.sh fast || rc=$?
        "$VENV/bin/python" -m pytest -m "cluster or slow" || rc=$?
        exit $rc ;;
    # One pytest-xdist worker per core (up to 8), one torch thread each: the unit tests are CPU-bound, so this is the
    # cores' whole speed without oversubscribing them; whole files to a worker, so a module's fixtures are built
    # once. `-n 0` (after the others) runs them in this one process.
    fast) workers=$(nproc); [ "$workers" -le 8 ] || workers=8
          OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec "$VENV/bin/python" -m pytest -m "not cluster and not slow" \
              -n "$workers" --dist loadfile "$@" ;;
    serve) exec "$VENV/bin/disagg" serve "$@" ;;
    help|-h|--help) sed -n 2,7p "$0" ;;
    *) exec "$VENV/bin/disagg" "$cmd" "$@" ;;
esac
