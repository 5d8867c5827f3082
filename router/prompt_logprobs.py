"""vLLM's `prompt_logprobs` in responses: the shape, and worker entries (`TokenLogprob`, one per prompt token after
the first) turned into it.

`prompt_logprobs` is a list with None for the first prompt token, then per prompt token a dict token id ->
{"logprob", "rank", "decoded_token"}: the prompt token itself (its rank among the vocabulary) and the k most likely
tokens at its position (ranks 1..k), as vLLM builds it (a prompt token among the top k keeps its place and takes
the top entry's values). -inf is written -9999.0, as vLLM clamps it. The key is left out of a response that did not
ask for it (`OmitsAbsentPromptLogprobs`), so nobody else's responses change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer

from proto import disagg_pb2

NEG_INF_AS = -9999.0  # vLLM's clamp: JSON has no -inf


class PromptLogprob(BaseModel):
    """vLLM's Logprob: one token's entry at one prompt position."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprob] | None]


class OmitsAbsentPromptLogprobs(BaseModel):
    """A response part whose `prompt_logprobs` key is written only when it holds something."""

    @model_serializer(mode="wrap")
    def _omit_absent_prompt_logprobs(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out = handler(self)
        if out.get("prompt_logprobs", 0) is None:
            del out["prompt_logprobs"]
        return out


def clamp(logprob: float) -> float:
    return max(logprob, NEG_INF_AS)


def prompt_logprobs(text_of: Any, prompt_ids: Sequence[int], entries: Sequence[disagg_pb2.TokenLogprob]
                    ) -> PromptLogprobs:
    """vLLM's list for a prompt; `entries[i]` scores prompt_ids[i + 1]. `text_of(token id)` is its decoded text."""
    out: PromptLogprobs = [None]
    for token_id, lp in zip(prompt_ids[1:], entries, strict=True):
        at = {str(token_id): PromptLogprob(logprob=clamp(lp.logprob), rank=lp.rank, decoded_token=text_of(token_id))}
        for rank, (t, v) in enumerate(zip(lp.top_ids, lp.top_logprobs, strict=True), start=1):
            at[str(t)] = PromptLogprob(logprob=clamp(v), rank=rank, decoded_token=text_of(t))
        out.append(at)
    return out
