"""Self-speculation: the target's first N layers, its final norm and its LM head form the draft model.

The draft's layer i < N is the target's layer i, so the K/V it computes at a position equals what the
target computes there, given the same tokens. It therefore reads and writes the target's own KV cache
(layers < N): every verified position already holds the target's KV, so nothing needs catching up and
prefix-cache hits and pulled KV are used as they are; the draft's writes at the last token and the draft
positions are overwritten by the target's verification pass, which recomputes all layers there.
"""

from __future__ import annotations

import torch

from engine.attention.base import AttentionMetadata
from engine.batch import BatchSeq
from engine.config import ConfigError
from engine.kv_cache_manager import KVCacheManager
from engine.model_runner import ModelRunner
from engine.scheduler import ScheduledRequest
from engine.spec_decode.draft import ModelProposer
from engine.spec_decode.sampling import fit_vocab


class SelfDraftProposer(ModelProposer):
    """Early-exit draft on the target's weights and KV cache; no extra memory."""

    name = "self"

    def __init__(self, runner: ModelRunner, num_layers: int, seed: int) -> None:
        super().__init__(runner.model_config.vocab_size, runner.device, seed)
        if num_layers > runner.model_config.num_layers:
            raise ConfigError(f"speculative.self_draft_layers is {num_layers}, but the model has "
                              f"{runner.model_config.num_layers} layers")
        self.runner, self.num_layers = runner, num_layers

    def _start(self, s: ScheduledRequest, kv: KVCacheManager, known_end: int) -> int:
        # The target's KV is the draft's for layers < N: only a decoding request's last token is pending.
        return s.request.num_computed_tokens if s.num_spec_tokens else known_end

    def _run(self, seqs: list[BatchSeq], kv: KVCacheManager) -> torch.Tensor:
        # Through the runner: under tensor parallelism every rank runs the draft's layers too.
        return fit_vocab(self.runner.draft_logits(seqs, kv, self.num_layers).float(), self.vocab_size)

    def _logits(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                logits_idx: torch.Tensor) -> torch.Tensor:
        raise AssertionError("self-speculation runs through ModelRunner.draft_logits (_run)")
