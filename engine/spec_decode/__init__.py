"""Speculative decoding: a cheap proposer guesses up to k next tokens, the target verifies them in one pass.

One step (LLMEngine.step):

    Scheduler.schedule()         a decoding request (one token to compute) gets 1 + k tokens: its last
                                 token plus k draft slots, blocks allocated for all of them. Slots come
                                 after every running request has its own token, from the leftover budget
                                 and free blocks only: speculation never preempts.
    Proposer.propose()           fills request.spec_token_ids (<= its slots); returns q for sampled drafts
    Scheduler.apply_proposals()  shrinks unused slots
    ModelRunner.launch()         target pass; logits at the last token and every draft position;
                                 rejection_sampler: accepted drafts + one target token per request
    Scheduler.update()           appends them one by one with the stop checks (EOS, stop ids, max_tokens,
                                 max_model_len: nothing after a stop), sets num_computed_tokens to the
                                 positions whose input is now a verified token, registers full verified
                                 blocks for prefix caching

Draft tokens live in `request.spec_token_ids` and are never part of output_token_ids (so never hashed
into a prefix-cache block) until accepted. KV written for rejected drafts sits at positions >=
num_computed_tokens and is overwritten when those positions are computed again.

Proposers (one file each, `base.Proposer` interface):
- ngram (ngram.py): prompt lookup; no model, q is a point mass.
- draft (draft.py): a separate small Llama with its own KV cache on the target's block tables; it
  computes every token the target computes (prompt chunks too), then k - 1 more autoregressive steps.
- self (self_draft.py): the target's first N layers + final norm + LM head, on the target's own cache.

Verification (rejection_sampler.py): greedy accepts while draft == target argmax; sampled requests use
the standard rule min(1, p/q) with residual normalize(max(0, p - q)) (for n-gram drafts drawn as a
coupling with the sampler's own draw, which is the same rule and keeps seeded outputs identical to
non-speculative ones). Seeded draws are keyed by (seed, output index): reproducible whatever the batch.

Deviations from the design brief, and why:
- Proposals are made right after scheduling, not before it. The draft and self proposers write KV at
  the last token and at the draft positions, which must be slots of blocks the request owns; those
  only exist once the scheduler has allocated them. The draft model also has to compute this step's
  prompt chunks, which are only known once scheduled. So the scheduler reserves up to k slots (from
  the budget and free blocks it would otherwise leave unused), the proposer fills them, and unused
  ones are given back before the target runs. The proposer still sees the requests' tokens, and no
  draft work is spent on a request that ends up preempted or not scheduled.
- After verification a running request keeps the blocks of its draft slots rather than trimming its
  table to its computed tokens: its next step's slots start one position later, so those blocks are
  exactly what its next drafts use (the caps on k shrink as fast as the request grows, so it never
  holds a block it could not use). Freeing them would only allocate other blocks one step later,
  evicting cached prefix blocks on the way. They are freed when the request finishes, is aborted or
  is preempted, trimmed off a finished request that keeps its blocks (prefill role), and reclaimed
  from every running request before the scheduler would preempt anyone, so speculation never causes
  a preemption.
- The draft model recomputes a request from position 0 the first time it sees it (after a prefix-cache
  hit, KV pulled from another worker, or preemption), because blocks shared by the prefix cache or
  pulled from elsewhere carry only the target's KV. Draft KV staleness could only lower the acceptance
  rate (verification never trusts it), but this keeps proposals as good as the draft can make them.

Notes:
- The draft model's KV cache has the target's block count and comes on top of cache.memory_budget_bytes.
- LLMEngine.set_speculative switches proposers (or turns speculation off) without reloading the target.
- Verifying 1 + k tokens costs about 1 + k decode tokens once the target's matmuls are compute-bound (a
  CPU with a batch of requests); speculation pays where a step is bound by reading the weights (batch
  1, GPUs) and drafts are accepted often. benchmarks/spec_decode.py measures both regimes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.model_runner import ModelRunner
    from engine.spec_decode.base import Proposer


def build_proposer(config: EngineConfig, runner: ModelRunner, num_blocks: int, max_model_len: int) -> Proposer | None:
    """The proposer `config.speculative` asks for, or None when speculation is off."""
    spec = config.speculative
    if spec is None or not spec.enabled:
        return None
    if spec.method == "ngram":
        from engine.spec_decode.ngram import NgramProposer

        return NgramProposer(spec.ngram_min, spec.ngram_max)
    if spec.method == "self":
        from engine.spec_decode.self_draft import SelfDraftProposer

        return SelfDraftProposer(runner, spec.self_draft_layers, config.seed)
    from engine.spec_decode.draft import DraftModelProposer

    return DraftModelProposer(config, spec, runner.model_config.vocab_size, num_blocks, max_model_len, runner.device)
