"""Prompt-lookup (n-gram) proposer: copy what followed the last time the current suffix appeared."""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from engine.kv_cache_manager import KVCacheManager
from engine.scheduler import SchedulerOutput
from engine.spec_decode.base import Proposer


def ngram_lookup(tokens: list[int], n_min: int, n_max: int, k: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the last n tokens (n from n_max down to
    n_min) in `tokens`. The copy runs on into its own proposal when the match is closer than k tokens to the end
    (a repeating pattern is continued). Empty when no suffix recurs."""
    size = len(tokens)
    if k <= 0 or size <= n_min:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        # windows start at 0..size-1-n, so every candidate ends before the last token: an *earlier* occurrence
        hits = np.flatnonzero((sliding_window_view(arr[: size - 1], n) == arr[size - n :]).all(axis=1))
        if hits.size:
            src = int(hits[-1]) + n  # first copied position, <= size - 1
            out: list[int] = []
            for j in range(k):
                out.append(tokens[src + j] if src + j < size else out[src + j - size])
            return out
    return []


class NgramProposer(Proposer):
    """No model: drafts come from the request's own prompt and output (Saxena 2023, 'prompt lookup decoding')."""

    name = "ngram"

    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max

    def propose(self, out: SchedulerOutput, kv: KVCacheManager) -> dict[str, torch.Tensor]:
        for s in out.scheduled:
            if s.num_spec_tokens:
                s.request.spec_token_ids = ngram_lookup(s.request.all_token_ids, self.n_min, self.n_max,
                                                        s.num_spec_tokens)
        return {}  # looked up, not sampled: q is a point mass on each draft
