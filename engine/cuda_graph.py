"""CUDA graphs for decode and verification steps: capture forward + LM head once per shape, replay after.

Decode is launch-bound at small batch: a 32-layer model issues hundreds of small kernels per step. A graph
replays them with one launch. A graph is keyed by (batch bucket, q), q being the tokens each sequence
computes: q = 1 for plain decode, q = 1 + k when the target verifies up to k draft tokens per request.
A batch of B sequences runs in the smallest bucket >= B; every sequence is padded to q tokens and the
bucket to its size with padding rows. For attention a small verification batch (up to PER_TOKEN_MAX_ROWS
tokens) treats every token as its own virtual sequence (token j of a sequence at position p sees the first
p + j + 1 positions through the sequence's block table), so it runs the decode kernel, which splits long
contexts across SMs; a larger one keeps one sequence per row of q queries and runs the prefill kernel, which
reads each context once. Padding never writes KV (slot -1), and no real query sees it: its positions lie
after the real tokens. Padding reads a real block and its output is dropped. Only the attention backends
that take device-side metadata alone (triton) can be captured: the torch reference reads host lengths.

Inputs reach the graphs' static buffers in two host-to-device copies per step (one int64 buffer for token
ids, positions and slots, one int32 buffer for lengths and block-table rows) from pinned host twins filled
with numpy from the KV cache manager's block-table array: no per-step tensor building beyond that.
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
PER_TOKEN_MAX_ROWS = 64  # H100, 8B shape: per-token attention beats per-sequence up to about this many tokens


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
        self.pool = None

    def _alloc_buffers(self, max_tokens: int) -> None:
        dev, pin = self.kv_cache.device, self.kv_cache.is_cuda
        n = self.max_tokens = max_tokens
        # Static inputs: views of two packed buffers (and pinned host twins), so a step's inputs arrive in two
        # copies: int64 ids | positions | slots, int32 seq_lens | block tables, one row per token.
        self.buf64 = torch.zeros(3 * n, dtype=torch.int64, device=dev)
        self.buf32 = torch.zeros(n * (1 + self.max_blocks), dtype=torch.int32, device=dev)
        self.host64 = torch.zeros(3 * n, dtype=torch.int64, pin_memory=pin)
        self.host32 = torch.zeros(n * (1 + self.max_blocks), dtype=torch.int32, pin_memory=pin)
        self.copied = torch.cuda.Event() if pin else None  # the host twins may be rewritten once it is done
        self.logits_out = torch.empty(n, self.model.config.vocab_size, dtype=torch.float32, device=dev)

    @staticmethod
    def per_token(bs: int, q: int) -> bool:
        """Attention layout of the (bs, q) graph: one virtual sequence per token (the decode kernel) up to
        PER_TOKEN_MAX_ROWS rows, beyond that one sequence per row of q queries (the prefill kernel), which reads
        each context once instead of q times."""
        return q == 1 or bs * q <= PER_TOKEN_MAX_ROWS

    def _views(self, bs: int, q: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        T, n = bs * q, self.max_tokens
        ids, pos, slots = self.buf64[:T], self.buf64[n : n + T], self.buf64[2 * n : 2 * n + T]
        rows, step = (T, 1) if self.per_token(bs, q) else (bs, q)
        seq_lens = self.buf32[:rows]
        tables = self.buf32[n : n + rows * self.max_blocks].view(rows, self.max_blocks)
        qsl = torch.arange(0, T + 1, step, dtype=torch.int32, device=self.kv_cache.device)  # constant per graph
        meta = AttentionMetadata(query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables, slot_mapping=slots,
                                 max_query_len=step, max_seq_len=self.max_model_len, query_start_loc_cpu=[],
                                 seq_lens_cpu=[])
        return ids, pos, meta

    def _forward(self, bs: int, q: int) -> torch.Tensor:
        ids, pos, meta = self._views(bs, q)
        hidden = self.model(ids, pos, self.kv_cache, meta, self.attn)
        # Every graph writes the one logits buffer (sampling reads it before the next replay, in stream order):
        # a buffer per graph would hold ~1 GB at a 128k vocabulary over the decode buckets.
        return self.model.compute_logits(hidden, self.logits_out[: bs * q])

    @torch.inference_mode()
    def capture(self, verify_q: int = 0) -> None:
        """Capture decode graphs (q = 1) for every bucket and, with verify_q > 1, verification graphs for
        buckets up to VERIFY_MAX_BATCH. Largest first, so smaller ones reuse its memory pool."""
        if verify_q > 1 and verify_q != self.verify_q:
            need = max(self.max_batch, verify_q * min(self.max_batch, VERIFY_MAX_BATCH))
            if need > self.max_tokens:  # grow the inputs; graphs captured on the old buffers are dropped
                self.graphs.clear()
                self.pool = None  # its graphs are gone: a pool without graphs cannot be captured into
                self._alloc_buffers(need)
            for key in [k for k in self.graphs if k[1] > 1]:  # one verification width at a time
                del self.graphs[key]
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
                self._forward(bs, q)
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
        meta.seq_lens.fill_(meta.max_query_len)
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

    def run(self, seqs: Sequence[BatchSeq], kv: KVCacheManager, q: int, input_ids: torch.Tensor | None = None
            ) -> torch.Tensor:
        """Replay the (bucket, q) graph for these sequences; returns logits at every real token, in order.
        `input_ids` (decode only, on the device) replaces the staged token ids of the first sequences."""
        B = len(seqs)
        bs = next(s for s in self.sizes if s >= B)
        tables = kv.table_array.gather([s.request_id for s in seqs])
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copies out of the host twins have landed
        real, pos = self._stage_tokens(seqs, tables, bs, q)
        used = self._stage_attention(tables, real, pos, bs, q)
        self.buf64.copy_(self.host64, non_blocking=True)
        self.buf32[:used].copy_(self.host32[:used], non_blocking=True)
        if input_ids is not None:
            assert q == 1 and input_ids.shape[0] <= B, "device input ids: one token each of the first sequences"
            self.buf64[: input_ids.shape[0]].copy_(input_ids)
        if self.copied is not None:
            self.copied.record()
        if (bs, q) in self.graphs:
            self.graphs[(bs, q)].replay()
            logits = self.logits_out[: bs * q]
        else:  # off CUDA (tests): the captured computation, run eagerly
            logits = self._forward(bs, q)
        if q == 1:
            return logits[:B]
        keep = (np.arange(B)[:, None] * q + np.arange(q)[None, :])[real]
        return logits[torch.from_numpy(keep).to(logits.device, non_blocking=True)]

    def _stage_tokens(self, seqs: Sequence[BatchSeq], tables: np.ndarray, bs: int, q: int
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Token ids, positions and KV slots into the int64 host twin; returns ([B, q] real-token mask, positions)."""
        B, n, T = len(seqs), self.max_tokens, bs * q
        h64 = self.host64.numpy()
        ids, pos, slots = h64[:T].reshape(bs, q), h64[n : n + T].reshape(bs, q), h64[2 * n : 2 * n + T].reshape(bs, q)
        ids[:] = 0
        if q == 1:
            ids[:B, 0] = np.fromiter((s.token_ids[0] for s in seqs), np.int64, B)
        else:
            for i, s in enumerate(seqs):
                ids[i, : len(s.token_ids)] = s.token_ids
        lens = np.fromiter((len(s.token_ids) for s in seqs), np.int64, B)
        start = np.fromiter((s.start for s in seqs), np.int64, B)
        real = np.arange(q)[None, :] < lens[:, None]
        pos[:] = 0  # padding sits at position 0: past the real tokens it could run beyond the rotary table
        pos[:B] = np.where(real, start[:, None] + np.arange(q)[None, :], 0)
        blk = tables[np.arange(B)[:, None], np.minimum(pos[:B] // self.block_size, tables.shape[1] - 1)]
        slots[:] = -1
        slots[:B] = np.where(real, blk.astype(np.int64) * self.block_size + pos[:B] % self.block_size, -1)
        return real, pos[:B]

    def _stage_attention(self, tables: np.ndarray, real: np.ndarray, pos: np.ndarray, bs: int, q: int) -> int:
        """Sequence lengths and block-table rows into the int32 host twin; returns how much of it to copy."""
        B, n, mb, h32 = len(real), self.max_tokens, self.max_blocks, self.host32.numpy()
        if self.per_token(bs, q):
            T = bs * q
            seq_lens = h32[:T].reshape(bs, q)
            seq_lens[:] = 1  # padding reads one slot of column 0 (a real block) and is dropped
            seq_lens[:B] = np.where(real, pos + 1, 1)
            rows = h32[n : n + T * mb].reshape(T, mb)  # columns past a row's blocks keep stale, valid ids
            rows[: B * q, : tables.shape[1]] = np.repeat(tables, q, axis=0) if q > 1 else tables
            rows[B * q :, 0] = 0
            return n + T * mb
        # One row per sequence: its real tokens, then padding, which no real query sees (attention is causal).
        h32[:bs] = q
        h32[:B] = pos[:, 0] + q
        rows = h32[n : n + bs * mb].reshape(bs, mb)
        rows[:B, : tables.shape[1]] = tables
        rows[B:, 0] = 0
        return n + bs * mb
