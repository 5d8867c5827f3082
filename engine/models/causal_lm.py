"""What every family shares around its decoder layers: embeddings -> layers -> final norm -> LM head.

The forward pass takes a flat batch of new tokens from many sequences (no padding) with their positions, and
attention metadata that says where each sequence's tokens and cached keys/values are. A decoder layer is called
as layer(x, rope, kv_cache_of_its_layer, meta, backend, residual) -> (x, residual): the residual add is done
by the next norm. Parameter names follow the Hugging Face checkpoints (see engine/models/checkpoint.py).
Under tensor parallelism the embeddings and the LM head hold a rank's share of the vocabulary
(engine/models/parallel.py): the logits are gathered from every rank.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.config import ModelConfig
from engine.models import ops
from engine.models.parallel import ParallelLMHead, gather_logits
from engine.parallel.group import current


class DecoderStack(nn.Module):
    """The checkpoint's `model.` part: token embeddings, decoder layers, final norm, rotary tables (no weights)."""

    def __init__(self, embed_tokens: nn.Module, layers: Iterable[nn.Module], norm: nn.Module, rotary_emb: nn.Module
                 ) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.rotary_emb = rotary_emb


class CausalLM(nn.Module):
    """Decoder stack plus the LM head (tied to the embedding when the config says so)."""

    # (model name fragment, checkpoint name fragment) for families whose checkpoints name a module differently
    checkpoint_renames: tuple[tuple[str, str], ...] = ()

    def __init__(self, cfg: ModelConfig, model: DecoderStack) -> None:
        super().__init__()
        self.config = cfg
        self.model = model
        self.head_weight: nn.Parameter | None = None  # set only by engine/quantization.py, for a tied LM head
        self.lm_head = None if cfg.tie_word_embeddings else ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        self.tp = current()

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_cache: torch.Tensor,  # [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]
        meta: AttentionMetadata,
        backend: AttentionBackend,
        num_layers: int | None = None,  # run only the first layers (a self-speculation draft); None: all
    ) -> torch.Tensor:  # [T, hidden]
        assert input_ids.dim() == 1 and input_ids.shape == positions.shape
        x, residual, rope = self.model.embed_tokens(input_ids), None, self.model.rotary_emb.at(positions)
        for i, layer in enumerate(self.model.layers):
            if i == num_layers:
                break
            x, residual = layer(x, rope, kv_cache[:, i], meta, backend, residual)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits [T, vocab] (soft-capped where the family caps them); written into `out` when given
        (a buffer shared by all CUDA graphs). Under tensor parallelism every rank calls it (a collective) and every
        rank gets the whole logits."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.head_weight is not None:  # a quantized copy of a tied LM head (engine/quantization.py)
            weight = self.head_weight
        logits = ops.linear(hidden, weight)
        if self.config.final_logit_softcap is not None:
            logits = ops.softcap(logits, self.config.final_logit_softcap)
        logits = gather_logits(logits, self.config.vocab_size, self.tp)
        return logits.float() if out is None else out.copy_(logits)
