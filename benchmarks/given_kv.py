"""Decode-only benchmarks take a request's context KV as given: reserved and marked received through the
engine's remote-KV API, as a decode worker does after a pull, but with no transfer (the blocks hold whatever
they held). Only decode steps are then timed."""

from __future__ import annotations

from engine.engine import LLMEngine
from engine.request import SamplingParams


def receive_given_kv(eng: LLMEngine, request_id: str, prompt: list[int], params: SamplingParams) -> None:
    """Queue `request_id` with its prompt's KV in place and one token (2) already sampled."""
    req = eng.make_request(request_id, prompt, params, output_token_ids=[2])
    if eng.receive_kv(req, len(prompt), timeout_s=3600.0) is None:
        raise RuntimeError(f"no KV blocks for {request_id}")
    eng.kv_received(request_id)
