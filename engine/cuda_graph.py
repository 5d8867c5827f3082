"""CUDA graphs for decode steps: capture the whole forward + LM head once per batch-size bucket, replay after.

Decode is launch-bound at small batch: a 32-layer model issues hundreds of small kernels per step. A graph
replays them with one launch. Inputs live in static buffers sliced per bucket; a batch of B requests runs
in the smallest bucket >= B with padded rows (slot -1: no KV write; seq_len 0: attention reads nothing).
Only the attention backends that take device-side metadata alone (triton) can be captured: the torch
reference reads host copies of the lengths.
"""

from __future__ import annotations

import logging

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 16))
    return sorted({s for s in sizes if s <= max_batch} | {max_batch})


class CUDAGraphRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, attn: AttentionBackend, max_batch: int,
                 max_model_len: int, block_size: int) -> None:
        self.model, self.kv_cache, self.attn = model, kv_cache, attn
        self.sizes = bucket_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.max_model_len = max_model_len
        dev = kv_cache.device
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(self.max_batch, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(self.max_batch, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((self.max_batch,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(self.max_batch, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(self.max_batch, max_blocks, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(self.max_batch + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: bs + 1], seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs], slot_mapping=self.slot_mapping[:bs], max_query_len=1,
            max_seq_len=self.max_model_len, query_start_loc_cpu=[], seq_lens_cpu=[],
        )

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self.kv_cache, self._meta(bs), self.attn)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture the largest bucket first so smaller ones reuse its memory pool."""
        for bs in reversed(self.sizes):
            for _ in range(2):  # warm-up: Triton autotuning and lazy allocations happen outside the graph
                self._forward(bs)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.logits[bs] = self._forward(bs)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[bs] = g
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, batch: int) -> bool:
        return 0 < batch <= self.max_batch

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Decode step for B sequences (one token each): copy into the bucket's buffers, replay, slice."""
        B = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= B)
        self.input_ids[:B].copy_(input_ids)
        self.positions[:B].copy_(positions)
        self.slot_mapping[:B].copy_(meta.slot_mapping)
        self.slot_mapping[B:bs].fill_(-1)
        self.seq_lens[:B].copy_(meta.seq_lens)
        self.seq_lens[B:bs].zero_()
        w = meta.block_tables.shape[1]
        self.block_tables[:B, :w].copy_(meta.block_tables)
        self.graphs[bs].replay()
        return self.logits[bs][:B]
