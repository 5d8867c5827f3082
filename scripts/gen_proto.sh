#!/usr/bin/env bash
# Generates proto/disagg_pb2.py and proto/disagg_pb2_grpc.py from proto/disagg.proto.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
"$PY" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. proto/disagg.proto
