"""SchedulerOutput -> flat tensors -> model -> sampler.

The runner owns the weights, the KV cache tensor and the attention backend.
Everything it needs about a step comes from the `SchedulerOutput` and the
KV cache manager's block tables; it keeps no per-request state.

With speculative decoding a request's new tokens end with its draft tokens
(`request.spec_token_ids`); the runner then takes logits at its last known
position and at every draft position, and the rejection sampler turns them
into the accepted drafts plus one token of the target's.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from engine.attention.base import AttentionMetadata, get_attention_backend
from engine.config import CacheConfig, EngineConfig, ModelConfig
from engine.cuda_graph import CUDAGraphRunner
from engine.kv_cache_manager import KVCacheManager
from engine.loader import (
    WeightLoadError,
    dummy_weights,
    iter_weights,
    load_model_config,
    resolve_source,
)
from engine.models.llama import LlamaForCausalLM
from engine.request import Request
from engine.sampler import Sampler, SampleResult
from engine.scheduler import SchedulerOutput
from engine.spec_decode.rejection_sampler import rejection_sample

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(config: EngineConfig, device: torch.device) -> LlamaForCausalLM:
    """Build the model on the meta device, then stream weights into freshly allocated storage."""
    fmt, path = resolve_source(config.model, config.load_format)
    dtype = DTYPES[config.dtype]
    if fmt == "dummy":
        assert config.dummy_model is not None
        model_config = config.dummy_model
        weights: Iterable[tuple[str, torch.Tensor]] = dummy_weights(model_config, dtype, config.seed, device=device)
    else:
        model_config = load_model_config(fmt, path)
        weights = iter_weights(fmt, path, model_config, dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(model_config)
    model = model.to(dtype).to_empty(device=device)
    _copy_weights(model, weights, source=path)
    model.model.rotary_emb.build_cache(device)
    return model.eval()


def _copy_weights(model: LlamaForCausalLM, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Copy checkpoint tensors (Hugging Face names) into the model, stacking q/k/v and gate/up rows."""
    params = dict(model.named_parameters())
    rows_filled: dict[str, int] = {}
    for name, tensor in weights:
        target, start, rows = model.stacked_target(name) or (name, 0, None)
        if target not in params:
            raise WeightLoadError(f"{source}: unexpected tensor {name!r}")
        dest = params[target] if rows is None else params[target][start : start + rows]
        if tuple(tensor.shape) != tuple(dest.shape):
            raise WeightLoadError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(dest.shape)}")
        with torch.no_grad():
            dest.copy_(tensor)
        rows_filled[target] = rows_filled.get(target, 0) + dest.shape[0]
    missing = sorted(n for n, p in params.items() if rows_filled.get(n, 0) != p.shape[0])
    if missing:
        raise WeightLoadError(f"{source}: missing tensor(s) for {', '.join(missing[:5])}")


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


def num_kv_blocks(cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    return max(1, cache.memory_budget_bytes // kv_bytes_per_block(cfg, cache.block_size, dtype))


class ModelRunner:
    """Runs one scheduled step on the model and samples where a request's computed tokens caught up."""

    def __init__(self, config: EngineConfig, device: torch.device, num_blocks: int, max_model_len: int) -> None:
        self.device = device
        self.model = load_model(config, device)
        self.model_config: ModelConfig = self.model.config
        cfg, dtype = self.model_config, DTYPES[config.dtype]
        self.kv_cache = torch.zeros(
            num_blocks, cfg.num_layers, 2, config.cache.block_size, cfg.num_kv_heads, cfg.head_dim,
            dtype=dtype, device=device,
        )
        self.attn = get_attention_backend(config.attention_backend, device)
        self.sampler = Sampler(config.seed)
        self.graphs: CUDAGraphRunner | None = None
        if device.type == "cuda" and not config.enforce_eager and self.attn.name == "triton":
            self.graphs = CUDAGraphRunner(self.model, self.kv_cache, self.attn, config.cuda_graph_max_batch,
                                          max_model_len, config.cache.block_size)
            self.graphs.capture()
        log.info("model %s: %d layers, KV cache %d blocks x %d tokens (%.1f MiB), attention=%s",
                 config.model, cfg.num_layers, num_blocks, config.cache.block_size,
                 self.kv_cache.numel() * dtype.itemsize / 2**20, self.attn.name)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, kv: KVCacheManager,
                draft_probs: dict[str, torch.Tensor] | None = None) -> list[list[SampleResult] | None]:
        """Per scheduled request: None (no token this step) or its new tokens, in order. Without drafts that is
        one sampled token; with drafts, the accepted drafts followed by the target's token. `draft_probs` holds
        the proposer's distributions q ([k, vocab]) of sampled requests whose drafts were sampled, not looked up."""
        input_ids, positions, meta, logits_idx = self._prepare(out, kv)
        samples = [s.samples for s in out.scheduled]
        sampling = [s for s, f in zip(out.scheduled, samples, strict=True) if f]
        if self.graphs is not None and meta.decode_only and self.graphs.can_run(len(out.scheduled)):
            logits = self.graphs.run(input_ids, positions, meta)  # decode: every row samples, no drafts
        else:
            hidden = self.model(input_ids, positions, self.kv_cache, meta, self.attn)
            if not sampling:
                return [None] * len(out.scheduled)
            logits = self.model.compute_logits(hidden[logits_idx])
        requests = [s.request for s in sampling]
        if any(s.num_spec_tokens for s in sampling):
            drafts = [s.request.spec_token_ids for s in sampling]
            probs = [(draft_probs or {}).get(r.request_id) for r in requests]
            verdicts = rejection_sample(self.sampler, logits, requests, drafts, probs)
        else:
            verdicts = [[t] for t in self.sampler.sample(logits, requests)]
        results: Iterator[list[SampleResult]] = iter(verdicts)
        return [next(results) if f else None for f in samples]

    def _prepare(
        self, out: SchedulerOutput, kv: KVCacheManager
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        seqs = []
        for s in out.scheduled:
            r = s.request
            start, known_end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens - s.num_spec_tokens
            tokens = _token_slice(r, start, known_end)
            if s.num_spec_tokens:
                tokens = tokens + r.spec_token_ids[: s.num_spec_tokens]
            seqs.append(BatchSeq(r.request_id, start, tokens, 1 + s.num_spec_tokens if s.samples else 0))
        return build_batch(seqs, kv, self.device)


@dataclass
class BatchSeq:
    """One sequence's share of a forward pass: `token_ids` at positions `start`, `start + 1`, ..."""

    request_id: str  # whose block table gives the KV slots
    start: int  # position of token_ids[0]
    token_ids: list[int]
    num_logits: int  # logits are wanted at this many last positions


def build_batch(
    seqs: list[BatchSeq], kv: KVCacheManager, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
    """Flatten sequences into (input_ids, positions, attention metadata, rows whose logits are wanted).

    Block tables and slots come from `kv`, so any model whose KV cache has the same block size and block
    count (a draft model's own cache) can run on the same metadata. Everything is computed with numpy over
    the manager's block-table array and reaches the device in one copy: per-sequence Python work is only
    reading each sequence's fields.
    """
    n, bs = len(seqs), kv.block_size
    lens = np.fromiter((len(s.token_ids) for s in seqs), np.int64, n)
    starts = np.fromiter((s.start for s in seqs), np.int64, n)
    num_logits = np.fromiter((s.num_logits for s in seqs), np.int64, n)
    qsl = np.zeros(n + 1, np.int64)
    np.cumsum(lens, out=qsl[1:])
    total = int(qsl[-1])
    seq_of = np.repeat(np.arange(n), lens)
    pos = np.arange(total) - qsl[:-1][seq_of] + starts[seq_of]
    tables = kv.table_array.gather([s.request_id for s in seqs])
    slots = tables[seq_of, pos // bs].astype(np.int64) * bs + pos % bs
    ends = qsl[1:]
    first_logit = np.repeat(ends - num_logits, num_logits)
    logits_idx = first_logit + np.arange(len(first_logit)) - np.repeat(np.cumsum(num_logits) - num_logits, num_logits)
    ids = np.fromiter(itertools.chain.from_iterable(s.token_ids for s in seqs), np.int64, total)
    seq_lens = starts + lens
    # One host buffer, one copy: [ids | positions | slots | logits rows] as int64, then [qsl | seq_lens | tables].
    parts = [ids, pos, slots, logits_idx, qsl, seq_lens, tables.reshape(-1)]
    sizes = [len(p) for p in parts]
    host = torch.empty(sum(sizes), dtype=torch.int64, pin_memory=device.type == "cuda")
    np.concatenate(parts, out=host.numpy(), casting="unsafe")
    dev = host.to(device, non_blocking=True)
    d_ids, d_pos, d_slots, d_logits, rest = torch.split(dev, [*sizes[:4], sum(sizes[4:])])
    d_qsl, d_lens, d_tables = torch.split(rest.to(torch.int32), sizes[4:])
    meta = AttentionMetadata(
        query_start_loc=d_qsl, seq_lens=d_lens, block_tables=d_tables.view(n, tables.shape[1]), slot_mapping=d_slots,
        max_query_len=int(lens.max()), max_seq_len=int(seq_lens.max()),
        query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=seq_lens.tolist(),
    )
    return d_ids, d_pos, meta, d_logits


def _token_slice(r: Request, start: int, end: int) -> list[int]:
    """Tokens [start, end) of prompt + output without concatenating the whole sequence."""
    p = len(r.prompt_token_ids)
    if end <= p:
        return r.prompt_token_ids[start:end]
    if start >= p:
        return r.output_token_ids[start - p : end - p]
    return r.prompt_token_ids[start:] + r.output_token_ids[: end - p]
