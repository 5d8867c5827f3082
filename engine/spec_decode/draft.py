"""Model-based proposers: a draft language model runs k autoregressive steps on the target's block tables.

`ModelProposer` does the stepping; subclasses say which model runs (`_hidden`, `_logits`) and which
positions it must (re)compute before it can propose (`_start`). Each step:

1. one pass over every scheduled request's pending tokens: for the draft model, the tokens the target
   computes this step (prompt chunks included) plus anything its own cache lacks; for a decoding request
   with draft slots, up to its last token, whose logits give draft 1;
2. k - 1 single-token passes, each feeding the previous draft, for the requests with slots left.

Draft KV for positions at and after the last token goes into the slots the scheduler allocated for
the drafts, so nothing is written outside the request's own blocks.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from dataclasses import dataclass, field

import torch

from engine.attention.base import AttentionMetadata, get_attention_backend
from engine.batch import BatchSeq, build_batch
from engine.config import ConfigError, EngineConfig, SpeculativeConfig
from engine.kv_cache_manager import KVCacheManager
from engine.model_runner import DTYPES, _token_slice, load_model
from engine.request import Request
from engine.sampler import mix_seed
from engine.scheduler import ScheduledRequest, SchedulerOutput
from engine.spec_decode.base import Proposer
from engine.spec_decode.sampling import DRAFT_SALT, RowView, fit_vocab, sample_drafts

log = logging.getLogger(__name__)


class ModelProposer(Proposer):
    """Proposes by sampling a draft model: greedy requests get its argmax, sampled ones a draw from its q."""

    def __init__(self, vocab_size: int, device: torch.device, seed: int) -> None:
        self.vocab_size = vocab_size  # the target's: q is always over the target's vocabulary
        self.device = device
        self._gen = torch.Generator(device=device).manual_seed(mix_seed(seed, DRAFT_SALT))

    @abstractmethod
    def _start(self, s: ScheduledRequest, kv: KVCacheManager, known_end: int) -> int:
        """First position the draft must compute this step (<= known_end; known_end means nothing pending)."""

    @abstractmethod
    def _logits(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                logits_idx: torch.Tensor) -> torch.Tensor:
        """Run the draft over a flat batch (writing its KV) and return its logits at `logits_idx`."""

    def _computed(self, req: Request, kv: KVCacheManager, known_end: int, drafted: list[int]) -> None:  # noqa: B027
        """The draft now holds KV for positions < known_end (the request's tokens) and, after them, `drafted`."""

    def _run(self, seqs: list[BatchSeq], kv: KVCacheManager) -> torch.Tensor:
        input_ids, positions, meta, logits_idx = build_batch(seqs, kv, self.device)
        return fit_vocab(self._logits(input_ids, positions, meta, logits_idx).float(), self.vocab_size)

    @torch.inference_mode()
    def propose(self, out: SchedulerOutput, kv: KVCacheManager) -> dict[str, torch.Tensor]:
        seqs: list[BatchSeq] = []
        ends: list[tuple[ScheduledRequest, int]] = []
        for s in out.scheduled:
            r = s.request
            known_end = r.num_computed_tokens + s.num_new_tokens - s.num_spec_tokens
            start = self._start(s, kv, known_end)
            if s.num_spec_tokens:
                start = min(start, r.num_tokens - 1)  # draft 1 comes from the logits at the last token
            if start < known_end:
                seqs.append(BatchSeq(r.request_id, start, _token_slice(r, start, known_end),
                                     1 if s.num_spec_tokens else 0))
            ends.append((s, known_end))
        active = [s for s in out.scheduled if s.num_spec_tokens]
        drafts: dict[str, list[int]] = {s.request.request_id: [] for s in active}
        qs: dict[str, list[torch.Tensor]] = {}
        logits = self._run(seqs, kv) if seqs else None
        for j in range(max((s.num_spec_tokens for s in active), default=0)):
            active = [s for s in active if s.num_spec_tokens > j]
            if j > 0:
                logits = self._run([BatchSeq(s.request.request_id, s.request.num_tokens - 1 + j,
                                             [drafts[s.request.request_id][-1]], 1) for s in active], kv)
            assert logits is not None and logits.shape[0] == len(active)
            views = [RowView(s.request, drafts[s.request.request_id]) for s in active]
            tokens, probs = sample_drafts(logits, views, self._gen)
            for s, t, q in zip(active, tokens, probs, strict=True):
                drafts[s.request.request_id].append(t)
                if q is not None:
                    qs.setdefault(s.request.request_id, []).append(q)
        for s, known_end in ends:
            d = drafts.get(s.request.request_id, [])
            s.request.spec_token_ids = d
            self._computed(s.request, kv, known_end, d[:-1])  # the last draft is proposed, never fed back
        return {rid: torch.stack(q) for rid, q in qs.items()}


@dataclass
class _DraftKV:
    """What the draft model's cache holds for one request."""

    confirmed: int  # positions < confirmed hold KV of the request's own tokens
    drafted: list[int]  # then KV of these draft tokens, at positions confirmed, confirmed + 1, ...
    blocks: list[int] = field(default_factory=list)  # the block table when it was written
    preemptions: int = 0  # the request's preemption count then (a preemption loses the blocks)


class DraftModelProposer(ModelProposer):
    """A separate small Llama (same tokenizer) with its own KV cache tensor, indexed by the target's block tables.

    Its cache has the target's block count and block size (its own layer/head shapes), so block b of a request
    holds the draft's KV for the same positions as the target's block b. It computes every token the target
    computes, in the same step. A request the draft has not seen (just admitted, prefix-cache hit, KV pulled
    from another worker, or preempted) is computed from position 0 on first sight: prefix-cache hits and pulled
    KV carry only the target's KV.
    """

    name = "draft"

    def __init__(self, config: EngineConfig, spec: SpeculativeConfig, vocab_size: int, num_blocks: int,
                 max_model_len: int, device: torch.device) -> None:
        super().__init__(vocab_size, device, config.seed)
        assert spec.draft_model is not None
        self.model = load_model(EngineConfig(model=spec.draft_model, dtype=config.dtype, device=config.device,
                                             seed=config.seed), device)
        cfg = self.model.config
        if cfg.max_position_embeddings < max_model_len:
            raise ConfigError(f"draft model {spec.draft_model} has a context of {cfg.max_position_embeddings} "
                              f"tokens, less than max_model_len {max_model_len}")
        if cfg.vocab_size != vocab_size:
            log.warning("draft vocabulary (%d) differs from the target's (%d): ids past the smaller are never proposed",
                        cfg.vocab_size, vocab_size)
        self.block_size = config.cache.block_size
        self.kv_cache = torch.zeros(num_blocks, cfg.num_layers, 2, self.block_size, cfg.num_kv_heads, cfg.head_dim,
                                    dtype=DTYPES[config.dtype], device=device)
        self.attn = get_attention_backend(config.attention_backend, device)
        self._state: dict[str, _DraftKV] = {}

    def _logits(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                logits_idx: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids, positions, self.kv_cache, meta, self.attn)
        return self.model.compute_logits(hidden[logits_idx])

    def _start(self, s: ScheduledRequest, kv: KVCacheManager, known_end: int) -> int:
        """Positions whose draft KV is valid: the confirmed ones, then drafts that turned out to be the request's
        tokens; never past a block that changed since it was written."""
        req = s.request
        st = self._state.get(req.request_id)
        if st is None or st.preemptions != req.num_preemptions:
            return 0
        valid = st.confirmed
        n_prompt = req.num_prompt_tokens
        for pos, t in enumerate(st.drafted, start=st.confirmed):
            if pos >= req.num_tokens or t != (req.prompt_token_ids[pos] if pos < n_prompt
                                              else req.output_token_ids[pos - n_prompt]):
                break
            valid += 1
        table = kv.block_table(req.request_id)
        same = 0
        while same < min(len(table), len(st.blocks)) and table[same] == st.blocks[same]:
            same += 1
        return min(valid, same * self.block_size, known_end)

    def _computed(self, req: Request, kv: KVCacheManager, known_end: int, drafted: list[int]) -> None:
        self._state[req.request_id] = _DraftKV(known_end, drafted, list(kv.block_table(req.request_id)),
                                               req.num_preemptions)

    def remove(self, request_id: str) -> None:
        self._state.pop(request_id, None)
