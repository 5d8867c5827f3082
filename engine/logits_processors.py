"""Per-request logit rules from vLLM's OpenAI extensions, applied in vLLM's order before the penalties:

1. allowed_token_ids: every other token at -inf;
2. bad_words_ids: a word's last token at -inf where the output already ends with the tokens before it (a one-token
   word always);
3. min_tokens: EOS and the request's stop tokens at -inf while the output is shorter than min_tokens;
4. logit_bias: the bias added to the token's logit.

Rows are Requests or anything shaped like one (spec_decode.sampling.RowView): `params` and `output_token_ids`.
`ahead[i]` counts tokens row i sampled that are not in its output yet (a step launched before the previous one
was read, engine/lookahead.py): min_tokens counts them. A multi-token bad word needs the output itself, so such a
row is never launched ahead (`needs_history`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from engine.request import SamplingParams


def has_rules(p: SamplingParams) -> bool:
    return bool(p.allowed_token_ids or p.bad_words_ids or p.min_tokens or p.logit_bias)


def has_multi_token_bad_word(p: SamplingParams) -> bool:
    return any(len(w) > 1 for w in p.bad_words_ids)


def _index(values: list[int] | list[float], device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    from engine.sampler import row_tensor  # here: engine.sampler imports this module

    return row_tensor(values, device, dtype)


def _banned(rows: Sequence[Any], ahead: Sequence[int], eos_token_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(row, token) pairs set to -inf by bad words and min_tokens."""
    bad_rows: list[int] = []
    bad_tokens: list[int] = []
    for i, r in enumerate(rows):
        p = r.params
        if p.min_tokens and len(r.output_token_ids) + ahead[i] < p.min_tokens:
            stops = {*p.stop_token_ids, *eos_token_ids}
            bad_rows += [i] * len(stops)
            bad_tokens += sorted(stops)
        for word in p.bad_words_ids:
            prefix = list(word[:-1])
            if not prefix or (len(r.output_token_ids) >= len(prefix) and r.output_token_ids[-len(prefix):] == prefix):
                bad_rows.append(i)
                bad_tokens.append(word[-1])
    return bad_rows, bad_tokens


def _only_allowed(logits: torch.Tensor, rows: Sequence[Any]) -> torch.Tensor:
    which = [i for i, r in enumerate(rows) if r.params.allowed_token_ids]
    if not which:
        return logits
    device = logits.device
    blocked = torch.ones(len(which), logits.shape[1], dtype=torch.bool, device=device)
    sub_rows = [k for k, i in enumerate(which) for _ in rows[i].params.allowed_token_ids]
    tokens = [t for i in which for t in rows[i].params.allowed_token_ids]
    blocked[_index(sub_rows, device), _index(tokens, device)] = False
    idx = _index(which, device)
    return logits.index_copy(0, idx, logits[idx].masked_fill(blocked, float("-inf")))


def apply_rules(logits: torch.Tensor, rows: Sequence[Any], ahead: Sequence[int] | None = None,
                eos_token_ids: Sequence[int] = ()) -> torch.Tensor:
    """Float32 logits after rules 1-4 (module docstring) for the rows that have any."""
    if not any(has_rules(r.params) for r in rows):
        return logits
    device = logits.device
    ahead = ahead if ahead is not None else [0] * len(rows)
    logits = _only_allowed(logits, rows)
    bad_rows, bad_tokens = _banned(rows, ahead, eos_token_ids)
    if bad_rows:
        logits = logits.index_put((_index(bad_rows, device), _index(bad_tokens, device)),
                                  torch.tensor(float("-inf"), device=device))
    bias = [(i, t, b) for i, r in enumerate(rows) for t, b in r.params.logit_bias]
    if bias:
        values = _index([b for _, _, b in bias], device, torch.float32)
        logits = logits.index_put((_index([i for i, _, _ in bias], device), _index([t for _, t, _ in bias], device)),
                                  values, accumulate=True)
    return logits
