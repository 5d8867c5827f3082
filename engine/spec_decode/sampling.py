"""Randomness and token views shared by the proposers and the rejection sampler.

A seeded request draws everything for output index n from fresh generators seeded with
`mix_seed(seed ^ salt, n)`: salt 0 is the sampler's own draw (engine.sampler), DRAFT_SALT the draft
model's sample, VERIFY_SALT the verifier's uniform and residual draw. Different salts make the three
independent; a fixed (seed, index) makes none of them depend on the batch, the step or the process.
Unseeded requests use shared generators instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.request import Request, SamplingParams
from engine.sampler import mix_seed, process_logits

DRAFT_SALT = 0x3C6EF372FE94F82B
VERIFY_SALT = 0x2545F4914F6CDD1D
_TINY = torch.finfo(torch.float32).tiny


def seeded_generator(seed: int, index: int, salt: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(mix_seed(seed ^ salt, index))


class RowView:
    """A request as the sampler sees it `len(extra)` tokens later: `extra` (the drafts before a position) appended.

    Quacks like a `Request` for `engine.sampler` (params, token lists, output length for the seed index), so the
    penalties and the seed of a draft position are those the position would have without speculation.
    """

    __slots__ = ("extra", "request")

    def __init__(self, request: Request, extra: list[int]) -> None:
        self.request = request
        self.extra = extra

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.request.output_token_ids + self.extra if self.extra else self.request.output_token_ids

    @property
    def all_token_ids(self) -> list[int]:
        return self.request.all_token_ids + self.extra

    @property
    def output_index(self) -> int:
        """Index in the output of the token this row decides."""
        return len(self.request.output_token_ids) + len(self.extra)


def race(weights: torch.Tensor, gen: torch.Generator) -> int:
    """One token drawn with probability proportional to `weights` ([vocab], >= 0): argmax(weights / Exp(1))."""
    noise = torch.empty_like(weights, dtype=torch.float32).exponential_(generator=gen).clamp_min_(_TINY)
    return int((weights.float() / noise).argmax())


def fit_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A draft model's logits over the target's vocabulary: extra ids cut, missing ids at -inf (never proposed)."""
    v = logits.shape[-1]
    if v == vocab_size:
        return logits
    if v > vocab_size:
        return logits[..., :vocab_size]
    return torch.nn.functional.pad(logits, (0, vocab_size - v), value=float("-inf"))


def sample_drafts(
    logits: torch.Tensor, views: Sequence[RowView], shared: torch.Generator
) -> tuple[list[int], list[torch.Tensor | None]]:
    """Draft tokens from the draft's processed distribution q (the request's penalties, temperature and filters):
    argmax for greedy requests, else a draw from q. Returns the tokens and q (float32 [vocab]) of sampled rows."""
    processed = process_logits(logits, views)  # type: ignore[arg-type]  # RowView quacks like Request
    tokens = processed.argmax(dim=-1).tolist()
    qs: list[torch.Tensor | None] = [None] * len(views)
    for i, v in enumerate(views):
        if v.params.greedy:
            continue
        q = processed[i].softmax(dim=-1)
        gen = shared if v.params.seed is None else seeded_generator(v.params.seed, v.output_index, DRAFT_SALT,
                                                                     logits.device)
        tokens[i] = race(q, gen)
        qs[i] = q
    return tokens, qs
