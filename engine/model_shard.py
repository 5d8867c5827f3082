"""One rank's share of the model: its weights, its KV cache, the attention backend and CUDA graphs; it turns a
batch of sequences into logits.

With one rank the shard is the whole model. Under tensor parallelism every rank holds one (rank 0's belongs to
the ModelRunner, the others' to their own processes, engine/parallel/rank.py) and all of them run `logits` on the
same batch: the collectives inside the forward pair up because every rank makes the same calls in the same
order. Every rank's `logits` returns the whole logits (they are gathered); only rank 0 samples from them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from engine.attention.base import get_attention_backend
from engine.batch import BatchSeq, build_batch
from engine.config import CacheConfig, EngineConfig, ModelConfig
from engine.cuda_graph import CUDAGraphRunner
from engine.fork import copy_blocks
from engine.fp8 import FP8
from engine.fp8_checkpoint import attach_scales, copy_fp8, finish_fp8, fp8_storage
from engine.loader import (
    WeightLoadError,
    dummy_weights,
    hf_fp8_weights,
    iter_weights,
    load_model_config,
    resolve_source,
)
from engine.models import registry
from engine.models.causal_lm import CausalLM
from engine.models.checkpoint import Slot
from engine.models.layers import RotaryEmbedding
from engine.models.parallel import check_divisible, kv_head_range
from engine.parallel.group import SINGLE, TPGroup, building
from engine.parallel.step import StepTables
from engine.quantization import quantize_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_config_of(config: EngineConfig) -> ModelConfig:
    """The shape of the model `config` names (read from its config.json or GGUF metadata; no weights)."""
    if config.load_format == "dummy":
        assert config.dummy_model is not None
        return config.dummy_model
    return load_model_config(*resolve_source(config.model, config.load_format))


def load_model(config: EngineConfig, device: torch.device, tp: TPGroup = SINGLE) -> CausalLM:
    """Build the model (rank `tp.rank`'s shard of it) on the meta device, then stream weights into freshly
    allocated storage: only this rank's slice of each tensor is read. Names and shapes are checked before the
    first tensor is read, and a model is returned only once every tensor is in place."""
    fmt, path = resolve_source(config.model, config.load_format)
    dtype = DTYPES[config.dtype]
    model_config = model_config_of(config)
    if tp.size > 1:
        check_divisible(model_config, tp.size)
    layout = registry.layout(model_config, tp.rank, tp.size)
    shards = {name: slot.shard for name, slot in layout.items() if slot.shard is not None}
    if fmt == "dummy":
        weights: Iterable[tuple[str, torch.Tensor]] = dummy_weights(model_config, dtype, config.seed, device, shards)
    else:
        weights = iter_weights(fmt, path, model_config, dtype, shards)
    with torch.device("meta"), building(tp):
        model = registry.build(model_config)
    model = model.to(dtype)
    fp8_params = fp8_storage(model, layout, hf_fp8_weights(path, model_config) if fmt == "hf" else frozenset())
    model = model.to_empty(device=device)
    attach_scales(model, fp8_params)
    _copy_weights(model, weights, path, layout)
    if fp8_params:  # an FP8 checkpoint (engine/fp8_checkpoint.py)
        finish_fp8(model, device, dtype)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build_cache(device)
        if hasattr(module, "zero_padding"):
            module.zero_padding()
    if config.quantization is not None:
        quantize_model(model, config.quantization, device)
    return model.eval()


def _copy_weights(model: CausalLM, weights: Iterable[tuple[str, torch.Tensor]], source: str,
                  layout: dict[str, Slot]) -> None:
    """Copy checkpoint tensors (Hugging Face names; this rank's slices) into the model, each into its slice of a
    stacked parameter (q/k/v, gate/up, experts) where the family stacks it."""
    params = dict(model.named_parameters())
    filled: set[str] = set()
    for name, tensor in weights:
        slot = layout.get(name)
        if slot is None:
            raise WeightLoadError(f"{source}: unexpected tensor {name!r}")
        dest = params[slot.param][slot.index]
        if tuple(tensor.shape) != tuple(dest.shape):
            raise WeightLoadError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(dest.shape)}")
        with torch.no_grad():
            if getattr(tensor, "quant_scale", None) is not None or dest.dtype == FP8:
                copy_fp8(params[slot.param], slot.index, tensor, f"{source}: tensor {name!r}")
            else:
                dest.copy_(tensor)
        filled.add(name)
    missing = [n for n in layout if n not in filled]
    if missing:
        raise WeightLoadError(f"{source}: missing tensor(s) {', '.join(missing[:5])}")


def kv_heads_per_rank(cfg: ModelConfig, tp_size: int) -> int:
    start, stop = kv_head_range(cfg.num_kv_heads, 0, tp_size)
    return stop - start


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
    """Bytes of one KV block on one rank (its KV heads)."""
    return cfg.num_layers * 2 * block_size * kv_heads_per_rank(cfg, tp_size) * cfg.head_dim * dtype.itemsize


def num_kv_blocks(cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype, tp_size: int = 1) -> int:
    """Blocks in the pool: the explicit count, or what the memory budget (per rank) holds."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    return max(1, cache.memory_budget_bytes // kv_bytes_per_block(cfg, cache.block_size, dtype, tp_size))


class ModelShard:
    """Weights, KV cache shard, attention backend and CUDA graphs of one rank."""

    def __init__(self, config: EngineConfig, device: torch.device, num_blocks: int, max_model_len: int,
                 tp: TPGroup = SINGLE) -> None:
        self.device, self.tp, self.max_model_len = device, tp, max_model_len
        self.model = load_model(config, device, tp)
        cfg, dtype = self.model.config, DTYPES[config.dtype]
        self.model_config: ModelConfig = cfg
        self.kv_cache = torch.zeros(num_blocks, cfg.num_layers, 2, config.cache.block_size,
                                    kv_heads_per_rank(cfg, tp.size), cfg.head_dim, dtype=dtype, device=device)
        self.attn = get_attention_backend(config.attention_backend, device)
        self.graphs: CUDAGraphRunner | None = None
        self.jit_kernels = device.type == "cuda" and self.attn.name == "triton"  # compiled at first launch
        self.warmed_up = False
        if device.type == "cuda" and not config.enforce_eager and self.attn.name == "triton":
            self.graphs = CUDAGraphRunner(self.model, self.kv_cache, self.attn, config.cuda_graph_max_batch,
                                          max_model_len, config.cache.block_size)

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def capture(self, verify_q: int = 0) -> None:
        """Capture decode graphs (and verification graphs of 1 + k tokens when verify_q > 1), and at the first call
        warm the eager path up where its kernels compile at first use (`warm_up`); every rank at once."""
        if self.graphs is not None:
            self.graphs.capture(verify_q=verify_q)
        if self.jit_kernels and not self.warmed_up:
            self.warm_up()

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One eager forward of a prompt (one per expert row-block size on a mixture-of-experts model) and one of a
        decode batch, before the engine takes a request. Triton compiles a kernel at its first launch in a process
        (or loads it from its disk cache): on a fresh machine that was 1.1-1.7 s of a first request's TTFT per
        kernel variant (benchmarks/RESULTS.md, "A fresh cluster's first requests"), and build_batch keeps every
        later batch on these same variants. The batches write their KV into block 0 only, which holds nothing yet:
        no request has blocks before the engine starts (and the graphs' capture writes no KV)."""
        bs, limit = self.kv_cache.shape[3], max(1, self.max_model_len - 1)
        lengths = [2 * bs + 1]
        moe = self.model_config.moe
        if moe is not None:  # the expert GEMM compiles a variant per row-block size, chosen by the token count
            from engine.kernels.moe import block_m_classes  # Triton: only where its kernels run

            lengths += block_m_classes(moe.num_experts, moe.num_experts_per_tok)[1:]
        batches = [[BatchSeq("warm-up", 0, [0] * n, 1)] for n in sorted({min(n, limit) for n in lengths})]
        batches.append([BatchSeq(f"warm-up-{i}", min(2 * bs, limit - 1), [0], 1) for i in range(2)])  # decode rows
        for seqs in batches:
            width = max(s.start + len(s.token_ids) for s in seqs) // bs + 1
            self.logits(seqs, StepTables(np.zeros((len(seqs), width), dtype=np.int32), bs))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmed_up = True

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks src -> dst (every layer, K and V), queued after any step already launched."""
        copy_blocks(self.kv_cache, pairs)

    def graph_query_len(self, seqs: Sequence[BatchSeq]) -> int | None:
        """The q of the CUDA graph that runs this batch, None to run it eagerly."""
        if self.graphs is None:
            return None
        return self.graphs.query_len([len(s.token_ids) for s in seqs], [s.num_logits for s in seqs])

    def logits(self, seqs: list[BatchSeq], kv: Any, input_ids: torch.Tensor | None = None, q: int | None = None,
               num_layers: int | None = None) -> torch.Tensor | None:
        """Forward the batch: the (bucket, q) CUDA graph when q is given, else eagerly through the first
        `num_layers` layers (all when None); logits where sequences want them, None if nowhere. `kv` gives block
        tables (a KVCacheManager, or a step message's StepTables). `input_ids`, when given, replaces the host token
        ids of the first len(input_ids) sequences (one token each) on the device."""
        if q is not None:
            assert self.graphs is not None and num_layers is None
            return self.graphs.run(seqs, kv, q, input_ids)
        ids, positions, meta, logits_idx = build_batch(seqs, kv, self.device)
        if input_ids is not None:
            ids[: input_ids.shape[0]].copy_(input_ids)
        hidden = self.model(ids, positions, self.kv_cache, meta, self.attn, num_layers=num_layers)
        if not len(logits_idx):
            return None
        return self.model.compute_logits(hidden[logits_idx])
