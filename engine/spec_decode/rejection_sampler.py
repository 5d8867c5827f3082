"""Verify draft tokens against the target model's logits.

A request with drafts d_1..d_k has k + 1 rows of target logits: row j is the target's next-token
distribution after the known tokens and d_1..d_j. Row j decides output index `len(output) + j`; its
p is the sampler's processed distribution (engine.sampler.process_logits: penalties, with the drafts
before it counted as output, then temperature, top-k, top-p, min-p) for that context.

- Greedy: accept d_{j+1} while it equals argmax p_j; at the first mismatch append the target's argmax,
  after all k the bonus argmax p_k.
- Sampled, drafts sampled from q (draft and self proposers): the standard speculative sampling rule
  (Leviathan et al. 2023; Chen et al. 2023). Accept d_{j+1} with probability min(1, p_j(d)/q_j(d)); on
  the first rejection append a draw from normalize(max(0, p_j - q_j)); after all k a bonus draw from p_k.
  Every token then has exactly the distribution non-speculative sampling gives it.
- Sampled, drafts looked up (n-gram; q is a point mass on d, q(d) = 1): the same rule, drawn in a coupled
  way. The sampler's own draw x ~ p_j (its Exp race with its own noise for that index) is made; d is
  accepted iff x == d (probability p_j(d) = min(1, p_j(d)/1)) and otherwise x is appended: given x != d, x
  is distributed as p_j restricted to tokens != d, renormalised, which is normalize(max(0, p_j - q_j)). So
  a seeded request gets exactly the tokens it gets without speculation.

A seeded request's uniforms and residual draws come from generators seeded with (seed, output index)
(see engine.spec_decode.sampling), so its tokens do not depend on the batch. Only draws at or before the
first rejection decide anything; later rows' draws are discarded and redone with the new context.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine import grammar
from engine.request import Request
from engine.sampler import DeviceSamples, Sampler, SampleResult, process_logits
from engine.spec_decode.sampling import VERIFY_SALT, RowView, race, seeded_generator


def rejection_sample(
    sampler: Sampler,
    logits: torch.Tensor,
    requests: Sequence[Request],
    drafts: Sequence[list[int]],
    draft_probs: Sequence[torch.Tensor | None],
) -> list[list[SampleResult]]:
    """For each request: its accepted drafts followed by one token of the target's (so 1 to k + 1 tokens).

    `logits` has len(drafts[i]) + 1 rows per request, in order. `draft_probs[i]` is q ([k_i, vocab]) when the
    request's drafts were sampled from a distribution, None when they were looked up (q is a point mass).
    """
    n_rows = sum(len(d) + 1 for d in drafts)
    if logits.dim() != 2 or logits.shape[0] != n_rows:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not match {n_rows} rows")
    views: list[RowView] = []
    first: list[int] = []
    for r, d in zip(requests, drafts, strict=True):
        first.append(len(views))
        views.extend(RowView(r, d[:j]) for j in range(len(d) + 1))
    general = {i for i, (r, d, q) in enumerate(zip(requests, drafts, draft_probs, strict=True))
               if d and q is not None and not r.params.greedy}

    # Rows decided by the sampler's own draw: all rows of greedy and point-mass requests, every bonus row.
    own = [first[i] + j for i, d in enumerate(drafts) for j in range(len(d) + 1) if i not in general or j == len(d)]
    own_logits = logits if len(own) == n_rows else logits[own]
    own_results = dict(zip(own, sampler.sample(own_logits, [views[x] for x in own]), strict=True))  # type: ignore[arg-type]
    decided = _test_sampled_drafts(sampler, logits, views, first, sorted(general), drafts, draft_probs)

    out: list[list[SampleResult]] = []
    for i, d in enumerate(drafts):
        if i in general:
            tokens, all_accepted = decided[i]
            out.append([*tokens, own_results[first[i] + len(d)]] if all_accepted else tokens)
            continue
        tokens: list[SampleResult] = []
        for j, t in enumerate(d):
            x = own_results[first[i] + j]
            tokens.append(x)
            if x.token_id != t:
                break
        else:
            tokens.append(own_results[first[i] + len(d)])
        out.append(tokens)
    return out


def _test_sampled_drafts(
    sampler: Sampler, logits: torch.Tensor, views: list[RowView], first: list[int], general: list[int],
    drafts: Sequence[list[int]], draft_probs: Sequence[torch.Tensor | None],
) -> dict[int, tuple[list[SampleResult], bool]]:
    """min(1, p/q) acceptance and residual draws for requests whose drafts were sampled from q: per request its
    accepted drafts plus the residual draw at the first rejection, and whether all drafts were accepted (then the
    bonus row decides the last token)."""
    if not general:
        return {}
    device = logits.device
    rows = [first[i] + j for i in general for j in range(len(drafts[i]))]
    row_views = [views[x] for x in rows]
    target = logits[rows]
    if grammar.has_grammar(row_views):  # each row masked by its grammar after the drafts before it (as the sampler
        target = grammar.apply_masks(target, row_views)  # masks the other rows); drafts are legal (trimmed before)
    p = process_logits(target, row_views, eos_token_ids=sampler.eos_token_ids).softmax(dim=-1)  # type: ignore[arg-type]
    q = torch.cat([draft_probs[i].to(device=device, dtype=torch.float32) for i in general])  # type: ignore[union-attr]
    if q.shape != p.shape:
        raise ValueError(f"draft probabilities of shape {tuple(q.shape)} for {tuple(p.shape)} target rows")
    d = torch.tensor([t for i in general for t in drafts[i]], dtype=torch.long, device=device)
    # One generator per seeded row: its uniform first, then (if rejected there) the residual draw.
    gens = [None if v.params.seed is None else seeded_generator(v.params.seed, v.output_index, VERIFY_SALT, device)
            for v in row_views]
    u = torch.empty(len(rows), dtype=torch.float32, device=device)
    unseeded = [g for g, gen in enumerate(gens) if gen is None]
    if unseeded:
        shared = sampler._generator(device)  # unseeded draws share the sampler's stream (one engine seed)
        u[unseeded] = torch.rand(len(unseeded), generator=shared, device=device)
    for g, gen in enumerate(gens):
        if gen is not None:
            u[g] = torch.rand(1, generator=gen, device=device)[0]
    p_d, q_d = p.gather(1, d[:, None])[:, 0], q.gather(1, d[:, None])[:, 0]
    accept = (u * q_d < p_d).tolist()
    raw = target.float().log_softmax(dim=-1) if any(v.params.logprobs is not None for v in row_views) else None

    def result(g: int, token: int) -> SampleResult:
        if raw is None:
            return SampleResult(token, None, None)
        return DeviceSamples(torch.tensor([token], device=device), [row_views[g].params], raw[g : g + 1]).results()[0]

    decided: dict[int, tuple[list[SampleResult], bool]] = {}
    g = 0
    for i in general:
        tokens: list[SampleResult] = []
        for j in range(len(drafts[i])):
            if accept[g + j]:
                tokens.append(result(g + j, drafts[i][j]))
                continue
            residual = (p[g + j] - q[g + j]).clamp_min(0)
            if not residual.sum() > 0:  # p == q up to rounding: rejection had probability ~0
                residual = p[g + j]
            gen = gens[g + j] or sampler._generator(device)
            tokens.append(result(g + j, race(residual, gen)))
            break
        decided[i] = (tokens, all(accept[g : g + len(drafts[i])]))
        g += len(drafts[i])
    return decided
