"""CUDA graphs for decode and verification steps: capture forward + LM head once per shape, replay after.

Decode is launch-bound at small batch: a 32-layer model issues hundreds of small kernels per step. A graph
replays them with one launch. A graph is keyed by (batch bucket, q), q being the tokens each sequence
computes: q = 1 for plain decode, q = 1 + k when the target verifies up to k draft tokens per request.
A batch of B sequences runs in the smallest bucket >= B; every sequence is padded to q tokens and the
bucket to its size with padding rows. Padding never writes KV (slot -1) and real queries never see it: a
padding token sits after the sequence's real tokens and attention is causal by position; padding rows
have seq_len q over block-table row 0 (reads of real blocks, results dropped). Only the attention backends
that take device-side metadata alone (triton) can be captured: the torch reference reads host lengths.

Inputs reach the graphs' static buffers in two host-to-device copies per step (one int64 buffer for token
ids, positions and slots, one int32 buffer for lengths and block tables), filled with numpy from the KV
cache manager's block-table array: no per-step tensor building beyond that.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.batch import BatchSeq
from engine.kv_cache_manager import KVCacheManager
from engine.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

VERIFY_MAX_BATCH = 64  # verification graphs cover batches up to this: speculation pays at small batch


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 1, 16))
    return sorted({s for s in sizes if s <= max_batch} | {max_batch})


class CUDAGraphRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, attn: AttentionBackend, max_batch: int,
                 max_model_len: int, block_size: int) -> None:
        self.model, self.kv_cache, self.attn = model, kv_cache, attn
        self.sizes = bucket_sizes(max_batch)
        self.max_batch = self.sizes[-1]
        self.max_model_len, self.block_size = max_model_len, block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.verify_q = 0  # 1 + k when verification graphs are captured, else 0
        self._alloc_buffers(self.max_batch)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self.pool = None

    def _alloc_buffers(self, max_tokens: int) -> None:
        dev = self.kv_cache.device
        # Static inputs: views of two packed buffers, so a step's inputs arrive in two copies.
        self.buf64 = torch.zeros(3 * max_tokens, dtype=torch.int64, device=dev)  # ids | positions | slots
        self.buf32 = torch.zeros(self.max_batch * (1 + self.max_blocks), dtype=torch.int32, device=dev)
        self.max_tokens = max_tokens

    def _views(self, bs: int, q: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        T, n = bs * q, self.max_tokens
        ids, pos, slots = self.buf64[:T], self.buf64[n : n + T], self.buf64[2 * n : 2 * n + T]
        seq_lens = self.buf32[:bs]
        tables = self.buf32[self.max_batch : self.max_batch + bs * self.max_blocks].view(bs, self.max_blocks)
        qsl = torch.arange(0, T + 1, q, dtype=torch.int32, device=self.kv_cache.device)  # constant per graph
        meta = AttentionMetadata(query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables, slot_mapping=slots,
                                 max_query_len=q, max_seq_len=self.max_model_len, query_start_loc_cpu=[],
                                 seq_lens_cpu=[])
        return ids, pos, meta

    def _forward(self, bs: int, q: int) -> torch.Tensor:
        ids, pos, meta = self._views(bs, q)
        hidden = self.model(ids, pos, self.kv_cache, meta, self.attn)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self, verify_q: int = 0) -> None:
        """Capture decode graphs (q = 1) for every bucket and, with verify_q > 1, verification graphs for
        buckets up to VERIFY_MAX_BATCH. Largest first, so smaller ones reuse its memory pool."""
        if verify_q > 1 and verify_q != self.verify_q:
            need = max(self.max_batch, verify_q * min(self.max_batch, VERIFY_MAX_BATCH))
            if need > self.max_tokens:  # grow the inputs; graphs captured on the old buffers are dropped
                self.graphs.clear()
                self.logits.clear()
                self.pool = None  # its graphs are gone: a pool without graphs cannot be captured into
                self._alloc_buffers(need)
            for key in [k for k in self.graphs if k[1] > 1]:  # one verification width at a time
                del self.graphs[key], self.logits[key]
            if not self.graphs:
                self.pool = None
            self.verify_q = verify_q
        shapes = [(bs, 1) for bs in self.sizes]
        if self.verify_q > 1:
            shapes += [(bs, self.verify_q) for bs in self.sizes if bs <= VERIFY_MAX_BATCH]
        todo = [s for s in shapes if s not in self.graphs]
        if not self.kv_cache.is_cuda:  # no graphs off CUDA: run() computes the same padded shapes eagerly
            return
        for bs, q in sorted(todo, key=lambda s: -s[0] * s[1]):
            self._reset_inputs(bs, q)
            for _ in range(2):  # warm-up: Triton autotuning and lazy allocations happen outside the graph
                self._forward(bs, q)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self.logits[(bs, q)] = self._forward(bs, q)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[(bs, q)] = g
        torch.cuda.synchronize()
        if todo:
            log.info("captured %d CUDA graphs: decode batches %s%s", len(todo), self.sizes,
                     f", verification of {self.verify_q - 1} drafts up to batch {VERIFY_MAX_BATCH}"
                     if self.verify_q > 1 else "")

    def _reset_inputs(self, bs: int, q: int) -> None:
        ids, pos, meta = self._views(bs, q)
        ids.zero_()
        pos.zero_()
        meta.slot_mapping.fill_(-1)
        meta.seq_lens.fill_(q)
        meta.block_tables.zero_()

    def query_len(self, token_counts: Sequence[int], logit_counts: Sequence[int]) -> int | None:
        """The q of a graph that can run this batch, or None. Every sequence must want logits at each of its
        tokens (decode, or decode plus drafts being verified)."""
        if not token_counts or list(token_counts) != list(logit_counts):
            return None
        longest = max(token_counts)
        if longest == 1:
            return 1 if len(token_counts) <= self.max_batch else None
        if longest <= self.verify_q and len(token_counts) <= min(self.max_batch, VERIFY_MAX_BATCH):
            return self.verify_q
        return None

    def run(self, seqs: Sequence[BatchSeq], kv: KVCacheManager, q: int) -> torch.Tensor:
        """Replay the (bucket, q) graph for these sequences; returns logits at every real token, in order."""
        B = len(seqs)
        token_ids = [s.token_ids for s in seqs]
        starts = [s.start for s in seqs]
        bs = next(s for s in self.sizes if s >= B)
        n, T = self.max_tokens, bs * q
        lens = np.fromiter((len(t) for t in token_ids), np.int64, B)
        start = np.fromiter(starts, np.int64, B)
        tables = kv.table_array.gather([s.request_id for s in seqs])
        pin = self.kv_cache.is_cuda
        host64 = torch.empty(3 * n, dtype=torch.int64, pin_memory=pin)
        h = host64.numpy()
        ids, pos, slots = h[:T].reshape(bs, q), h[n : n + T].reshape(bs, q), h[2 * n : 2 * n + T].reshape(bs, q)
        ids[:] = 0
        if q == 1:
            ids[:B, 0] = np.fromiter((t[0] for t in token_ids), np.int64, B)
        else:
            for i, t in enumerate(token_ids):
                ids[i, : len(t)] = t
        pos[:] = np.arange(q)
        pos[:B] += start[:, None]
        real = np.arange(q)[None, :] < lens[:, None]
        blk = np.minimum(pos[:B] // self.block_size, tables.shape[1] - 1)
        slots[:] = -1
        slots[:B] = np.where(real, tables[np.arange(B)[:, None], blk].astype(np.int64) * self.block_size
                             + pos[:B] % self.block_size, -1)
        host32 = torch.empty(self.max_batch + bs * self.max_blocks, dtype=torch.int32, pin_memory=pin)
        h32 = host32.numpy()
        h32[:bs] = q  # padding rows: q tokens over block 0
        h32[:B] = start + q
        t32 = h32[self.max_batch :].reshape(bs, self.max_blocks)
        t32[:] = 0
        t32[:B, : tables.shape[1]] = tables
        self.buf64[: 3 * n].copy_(host64, non_blocking=True)
        self.buf32[: len(h32)].copy_(host32, non_blocking=True)
        if (bs, q) in self.graphs:
            self.graphs[(bs, q)].replay()
            logits = self.logits[(bs, q)]
        else:  # off CUDA (tests): the captured computation, run eagerly
            logits = self._forward(bs, q)
        if q == 1:
            return logits[:B]
        rows = (np.arange(B)[:, None] * q + np.arange(q)[None, :])[real]
        return logits[torch.from_numpy(rows).to(logits.device, non_blocking=True)]
