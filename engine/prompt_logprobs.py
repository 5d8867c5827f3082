"""Prompt logprobs (vLLM's `prompt_logprobs`): for every prompt token after the first, its logprob given the tokens
before it, its rank and the k most likely tokens at its position, taken from the logits at every prompt position
while the prompt runs (each chunk of a chunked prefill gives its own positions).

Only requests that ask pay anything. The runner widens the logits of such a request's prompt chunk from its last
position to every position still to score (`prompt_spans`); the step's logits then hold those rows too, and
`split_logits` takes them out, leaving the sampler exactly the rows it would have had (one per sampling request, or
1 + k when verifying drafts). A step without such a request is built exactly as before.

Invariants:
- position p's logits score prompt token p + 1, so a request scores positions 0 .. P - 2 (P: prompt length);
- records are appended in position order and only contiguously: a span starts at the first unrecorded position,
  so a preempted request recomputes its prompt without recording a position twice; a request whose computed
  tokens start past its records (KV received from elsewhere) records nothing and returns none;
- such a request computes its whole prompt (`Request.needs_prompt_logprobs`: no prefix-cache match, no fork);
- the records go out once, with the request's first output (`take`), and are not computed after that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.batch import BatchSeq
from engine.request import PromptLogprob, Request
from engine.sampler import copy_to_host, row_tensor

ROWS_PER_SLICE = 1024  # rows turned to float32 logprobs at once: bounds the extra memory of a long chunk


@dataclass
class Span:
    """The positions of one request's chunk scored this step: [lo, hi), their logits at rows row .. row + hi - lo."""

    request: Request
    lo: int
    hi: int
    row: int


def wanted(req: Request, start: int, end: int) -> tuple[int, int]:
    """The positions of [start, end) whose logits score a prompt token not recorded yet: [lo, hi), empty if lo >= hi."""
    if not req.needs_prompt_logprobs:
        return 0, 0
    recorded = len(req.prompt_logprobs)
    if start > recorded:  # positions before this chunk were never scored here: the records cannot be completed
        return 0, 0
    return max(start, recorded), min(end, req.num_prompt_tokens - 1)


def prompt_spans(requests: list[Request], seqs: list[BatchSeq], num_spec: list[int]) -> list[Span]:
    """Widen `seqs[i].num_logits` of the requests that want prompt logprobs to every position to score; returns
    their spans (none: the batch is left untouched). A chunk verifying drafts is a decode step: nothing to score."""
    spans, row = [], 0
    for req, seq, spec in zip(requests, seqs, num_spec, strict=True):
        end = seq.start + len(seq.token_ids)
        lo, hi = wanted(req, seq.start, end) if not spec else (0, 0)
        if lo < hi:
            seq.num_logits = max(seq.num_logits, end - lo)  # the rows of positions lo .. end - 1
            spans.append(Span(req, lo, hi, row))
        row += seq.num_logits
    return spans


def split_logits(logits: torch.Tensor, seqs: list[BatchSeq], num_spec: list[int], samples: list[bool],
                 spans: list[Span]) -> tuple[torch.Tensor | None, PromptLogprobs]:
    """The sampling rows of `logits` (each sampling sequence's last 1 + drafts rows, None if no sequence samples)
    and the prompt logprobs of `spans`, queued on the device."""
    keep, row = [], 0
    for seq, spec, sampled in zip(seqs, num_spec, samples, strict=True):
        row += seq.num_logits
        if sampled:
            keep.extend(range(row - 1 - spec, row))
    prompt = PromptLogprobs(logits, spans)
    return (logits[row_tensor(keep, logits.device, torch.long)] if keep else None), prompt


class PromptLogprobs:
    """One step's prompt logprobs: computed on the device, copied to the host without a stream sync (as
    engine.sampler.DeviceSamples), recorded on their requests by `record`."""

    def __init__(self, logits: torch.Tensor, spans: list[Span]) -> None:
        self.spans = spans
        self.k = max(s.request.params.prompt_logprobs or 0 for s in spans)
        pieces = []
        for s in spans:
            for a in range(s.lo, s.hi, ROWS_PER_SLICE):  # positions a .. b - 1 score prompt tokens a + 1 .. b
                b = min(a + ROWS_PER_SLICE, s.hi)
                rows = logits[s.row + a - s.lo : s.row + b - s.lo]
                pieces.append(self._score(rows, s.request.prompt_token_ids[a + 1 : b + 1]))
        packed = torch.cat(pieces)
        self._host, self._ready = copy_to_host(packed)

    def _score(self, rows: torch.Tensor, targets: list[int]) -> torch.Tensor:
        """[n, 2 + 2k] float64: per row, the target's logprob, its rank, the top k ids, their logprobs."""
        lp = rows.float().log_softmax(dim=-1)
        chosen = lp.gather(1, row_tensor(targets, lp.device, torch.long)[:, None])
        rank = (lp >= chosen).sum(dim=-1, keepdim=True)  # vLLM's rank: tokens at least as likely, itself included
        top_v, top_i = lp.topk(self.k, dim=-1)
        return torch.cat([chosen.double(), rank.double(), top_i.double(), top_v.double()], dim=1)

    def record(self) -> None:
        """Wait for this step's copy and append each span's records to its request, in position order."""
        if self._ready is not None:
            self._ready.synchronize()
        rows, n, k = self._host.tolist(), 0, self.k
        for s in self.spans:
            req, want = s.request, s.request.params.prompt_logprobs or 0
            mine, n = rows[n : n + s.hi - s.lo], n + s.hi - s.lo
            if len(req.prompt_logprobs) != s.lo or not req.needs_prompt_logprobs:
                continue  # never out of order (see the module docstring)
            req.prompt_logprobs.extend(
                (r[0], int(r[1]), [(int(t), v) for t, v in zip(r[2 : 2 + want], r[2 + k : 2 + k + want], strict=True)])
                for r in mine)


def take(req: Request) -> list[PromptLogprob | None] | None:
    """The request's prompt logprobs for its first output, vLLM's shape (None for the first prompt token), once:
    None if it did not ask, already had them, or its prompt was not computed here in full."""
    if not req.needs_prompt_logprobs:
        return None
    records, req.prompt_logprobs, req.prompt_logprobs_sent = req.prompt_logprobs, [], True
    return [None, *records] if len(records) == req.num_prompt_tokens - 1 else None
