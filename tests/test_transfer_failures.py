"""KV transfer through the real cluster: the TCP backend, injected failures and timeouts (each must end in a
local recompute with correct output, counted in metrics), and lease expiry on the prefill worker."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import openai
import pytest

from engine.llm import LLM
from engine.request import SamplingParams
from proto import PROTOCOL_VERSION, disagg_pb2, disagg_pb2_grpc
from tests.cluster_util import start_cluster, wait_blocks_free, worker_load

pytestmark = pytest.mark.cluster  # starts real router/worker processes (or Ray): not in the fast tier

PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def reference_text() -> str:
    return LLM("smollm2", num_blocks=64).generate(PROMPT, SamplingParams(max_tokens=16, temperature=0))[0].text


def complete(c) -> str:  # noqa: ANN001
    cl = openai.OpenAI(base_url=f"{c.url}/v1", api_key="x", max_retries=0, timeout=120)
    return cl.completions.create(model="smollm2", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text


@pytest.mark.parametrize("backend, fault, expect_recompute", [
    ("tcp", None, False),
    ("nixl", "fail", True),
    ("tcp", "hang", True),
])
def test_transfer_paths(tmp_path, reference_text: str, backend: str, fault: str | None, expect_recompute: bool
                        ) -> None:  # noqa: ANN001
    transfer = {"backend": backend, "timeout_s": 1.0, "lease_s": 3.0, "fault": fault}
    c = start_cluster(tmp_path, f"{backend}-{fault}", transfer=transfer)
    try:
        t0 = time.monotonic()
        assert complete(c) == reference_text
        dec = worker_load(c.procs["decode-0"].address)
        if expect_recompute:
            assert dec.recomputes == 1 and dec.transfer_failures == 1 and dec.transfers == 0
            if fault == "hang":
                assert time.monotonic() - t0 >= 1.0  # it waited for the timeout, then recomputed
            metrics = httpx.get(f"{c.url}/metrics", timeout=10).text
            assert any(line.startswith(("disagg_worker_recomputes", "worker_recomputes")) and line.endswith(" 1.0")
                       for line in metrics.splitlines()), "recompute not visible in /metrics"
        else:
            assert dec.transfers == 1 and dec.recomputes == 0 and dec.transfer_bytes > 0
        for name in ("prefill-0", "decode-0"):
            rep = wait_blocks_free(c.procs[name].address)
            assert rep.kv_blocks_free == rep.kv_blocks_total, f"{name} leaked blocks"
        if fault == "hang":
            check_lease_expiry(c.procs["prefill-0"].address)
    finally:
        c.stop()


def check_lease_expiry(address: str) -> None:
    """A prefill whose KV is never pulled is freed when its lease (3 s) runs out."""
    async def prefill() -> disagg_pb2.PrefillResponse:
        async with grpc.aio.insecure_channel(address) as ch:
            req = disagg_pb2.PrefillRequest(version=PROTOCOL_VERSION, request_id="orphan",
                                            prompt_token_ids=list(range(100, 180)),
                                            params=disagg_pb2.SamplingParams(max_tokens=8, top_p=1.0))
            return await disagg_pb2_grpc.WorkerStub(ch).Prefill(req, timeout=30)

    resp = asyncio.run(prefill())
    assert len(resp.kv.block_ids) == 5
    rep = worker_load(address)
    assert rep.leased_requests == 1 and rep.kv_blocks_free == rep.kv_blocks_total - 5
    time.sleep(3.5)
    rep = worker_load(address)
    assert rep.leased_requests == 0 and rep.kv_blocks_free == rep.kv_blocks_total and rep.leases_expired == 1
