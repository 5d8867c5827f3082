#!/usr/bin/env bash
# A held-out check of the simulator on one GPU, in one go: profile this GPU with `disagg profile` alone (the
# Llama-3-8B shape, the engine co-runner, the paced decode spread at 1-32 rows), then replay a fresh seeded trace on
# a real 1P+1D and co-located cluster on the same GPU and simulate it with that profile, nothing fitted to the run
# (benchmarks/RESULTS.md, "The profile alone with the paced spread by rows"). ~7 min on an H100.
#
#   benchmarks/gpu_held_out.sh OUT SEED TOKENIZER.gguf [MODES] [RATES]
#
# OUT: a folder for the profile, the report (JSON and PNG), the traces and the workers' step logs (a .tgz); an
# OUT/profile.json already there is reused (a second call after a failed validation need not profile again);
# SEED: a trace seed never run before; TOKENIZER.gguf: the router's tokenizer (scripts/tokenizer_gguf.py makes a
# 1.7 MB one from the packaged SmolLM2 GGUF); MODES: disaggregated,colocated (default); RATES: 5,7 (default).
# It first imports the worker and the router, so a machine missing a package fails in seconds, not after the
# profile: fastapi >= 0.16x needs opentelemetry-api, and gRPC stubs generated with a newer grpcio than the
# machine's refuse to import (regenerate them there with scripts/gen_proto.sh, or carry that grpcio).
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n 2,15p "$0"
    exit 2
fi
out=$1 seed=$2 tok=$3 modes=${4:-disaggregated,colocated} rates=${5:-5,7}
python=${PYTHON:-python3}
mkdir -p "$out"
$python -c "import worker.server, router.app"
[ -f "$out/profile.json" ] || $python -m deploy.cli profile --device cuda --dummy llama3-8b-v49k --repeat 2 --kv-gib 30 \
    --decode-batch 1,8,32,64,128 --decode-context 256,512,1024,2048 --co-run-with engine \
    --out "$out/profile.json" 2>&1 | tee "$out/profile.log"
$python -m benchmarks.sim_validate --device cuda --tokenizer "$tok" --profile "$out/profile.json" \
    --rates "$rates" --seed "$seed" --num-requests 160 --prompt-len 1024:2048 --output-len 128 \
    --slo-ttft-ms 500 --slo-itl-ms 30 --calibrate admit --client-processes 1 --modes "$modes" \
    --keep-logs "$out/logs" --label "seed$seed" --out "$out" 2>&1 | tee "$out/validate.log"
tar czf "$out/steps_seed$seed.tgz" -C "$out" logs && rm -rf "$out/logs"
