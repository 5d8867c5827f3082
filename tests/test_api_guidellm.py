"""guidellm 0.8.1 (the vLLM project's load generator) drives a real cluster: 8 concurrent streams, every request
successful; and `disagg bench` at the same load reports TTFT and ITL within noise of guidellm's.

guidellm pulls torch, pandas and pyarrow, so it lives in its own virtualenv: $GUIDELLM names its executable (else
`guidellm` on PATH, else /work/venv-guidellm/bin/guidellm); the test is skipped without one.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import pytest

from benchmarks.guidellm_compare import run_disagg_bench, run_guidellm
from tests.cluster_util import start_cluster, wait_blocks_free

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def guidellm() -> str | None:
    for candidate in (os.environ.get("GUIDELLM"), shutil.which("guidellm"), "/work/venv-guidellm/bin/guidellm"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.mark.skipif(guidellm() is None, reason="guidellm is not installed (set $GUIDELLM)")
def test_guidellm_and_disagg_bench_agree(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path, "guidellm")
    try:
        load = argparse.Namespace(url=cluster.url, model="smollm2", streams=8, requests=32, prompt_tokens=64,
                                  output_tokens=16, timeout=900.0)
        g = run_guidellm(guidellm(), load, tmp_path)  # type: ignore[arg-type]
        d = run_disagg_bench(load, tmp_path)
        assert (g["successful"], g["errored"], g["incomplete"]) == (32, 0, 0), g
        assert (d["successful"], d["errored"]) == (32, 0), d
        # Same load, same server: the medians agree within noise (a shared 2-core machine: a factor, not percent).
        for key in ("ttft_p50_ms", "itl_p50_ms"):
            assert 0.5 <= g[key] / d[key] <= 2.0, (key, g, d)
        for name in ("prefill-0", "decode-0"):
            rep = wait_blocks_free(cluster.procs[name].address)
            assert rep.kv_blocks_free == rep.kv_blocks_total
    finally:
        cluster.stop()
