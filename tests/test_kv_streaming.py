"""Layer-wise KV streaming through the real cluster: the decode worker pulls each layer group of a prompt's KV
while the prefill worker still computes it (decode_worker/kv_stream.py), with chunked prefill so that groups of
early chunks arrive before later chunks run. Output must equal the single-process engine's; nothing may be
recomputed, and every block comes back."""

from __future__ import annotations

import openai
import pytest

from engine.llm import LLM
from engine.request import SamplingParams
from tests.cluster_util import start_cluster, wait_blocks_free

pytestmark = pytest.mark.cluster  # starts real router/worker processes: not in the fast tier

PROMPTS = ["Explain why the sky is blue. " * 12, "List the planets of the solar system in order. " * 9, "Hi"]


@pytest.mark.parametrize("backend", ["tcp", "nixl"])
def test_streamed_kv_equals_single_process(tmp_path, backend: str) -> None:  # noqa: ANN001
    reference = LLM("smollm2", num_blocks=256)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = [o.text for o in reference.generate(PROMPTS, params)]
    cluster = start_cluster(tmp_path, f"stream-{backend}",
                            engine={"scheduler": {"max_num_batched_tokens": 48}},  # several chunks per prompt
                            transfer={"backend": backend, "layer_groups": 3},
                            router={"kv_streaming": True})
    try:
        client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=120)
        for prompt, ref in zip(PROMPTS, expected, strict=True):
            stream = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
            assert "".join(ch.choices[0].text for ch in stream if ch.choices) == ref
        dec = wait_blocks_free(cluster.procs["decode-0"].address)
        pre = wait_blocks_free(cluster.procs["prefill-0"].address)
        assert dec.transfers == len(PROMPTS) and dec.recomputes == 0 and dec.transfer_failures == 0
        assert dec.stream_reads > dec.transfers  # the long prompts came in several group/chunk reads, not one
        for rep in (dec, pre):
            assert rep.kv_blocks_free == rep.kv_blocks_total and rep.leased_requests == 0
            assert rep.num_receiving_kv == 0 and rep.kv_blocks_quarantined == 0
    finally:
        cluster.stop()
