#!/bin/bash
# Why NIXL/UCX moves GPU memory slowly between two processes on one GPU (issue 15): run on a GPU machine with NIXL
# installed (nixl-cu13 for CUDA 13). Writes into OUT (default ./nixl_probe): the UCX debug log (gzipped), its lines
# about CUDA IPC and memory types, UCX's protocol tables for the run, and reads with a few UCX settings.
#   bash scripts/nixl_gpu_probe.sh [OUT]
set -u
OUT=${1:-${OUT:-nixl_probe}}
mkdir -p "$OUT"
L=$OUT/probe.log
B="python3 -m kvtransfer.bench --device cuda"
{ echo "# PID namespaces (self, init)"; readlink /proc/self/ns/pid /proc/1/ns/pid
  echo "# GPU topology"; nvidia-smi topo -m
  echo "# UCX modules of the NIXL wheel that do not load"
  python3 - <<'PY'
import ctypes, glob, importlib.util, os
spec = importlib.util.find_spec("nixl_cu13") or importlib.util.find_spec("nixl_cu12")
libs = glob.glob(os.path.join(os.path.dirname(os.path.dirname(spec.origin)), "nixl_cu1*.libs"))[0] if spec else ""
for so in ["libucs", "libucm", "libuct", "libucp"]:  # the core first: modules need its symbols
    for path in glob.glob(f"{libs}/{so}-*.so*"):
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
for path in sorted(glob.glob(f"{libs}/ucx/*.so*")):
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        print("loads", os.path.basename(path))
    except OSError as e:
        print("FAILS", os.path.basename(path), e)
PY
} >>"$L" 2>&1
UCX_LOG_LEVEL=debug timeout 60 $B --mib 64 --repeat 2 nixl >"$OUT/ucx_debug.log" 2>&1
grep -i -E "cuda_ipc|reachab|same process|namespace|fabric|cudaipc|mem_type|memtype|lane" "$OUT/ucx_debug.log" \
    | cut -c1-300 | head -400 >"$OUT/ucx_cuda_ipc.txt"
gzip -f "$OUT/ucx_debug.log"
UCX_PROTO_INFO=y timeout 60 $B --mib 64 --repeat 2 nixl 2>&1 | grep -v copy_blocks >"$OUT/proto_info.txt"
for env in "" "UCX_TLS=^tcp" "UCX_TLS=cuda_ipc,cuda_copy,self,sm" "UCX_MEMTYPE_CACHE=n"; do
    echo "# ${env:-defaults}" >>"$L"
    env $env timeout 60 $B --mib 256 --repeat 3 nixl 2>&1 | grep -E "^nixl|Error|error" >>"$L"
done
echo "# NIXL against CUDA IPC and the device copy, 2 GiB" >>"$L"
timeout 120 $B --mib 2048 --repeat 5 --chunk-blocks 128 cuda_ipc nixl 2>&1 | grep -E "^(nixl|cuda_ipc|device)" >>"$L"
cat "$L"
