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

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from engine.attention.base import get_attention_backend
from engine.batch import BatchSeq, build_batch
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
from engine.models import registry
from engine.models.causal_lm import CausalLM
from engine.models.layers import RotaryEmbedding
from engine.request import Request
from engine.sampler import DeviceSamples, Sampler, SampleResult, row_tensor
from engine.scheduler import SchedulerOutput
from engine.spec_decode.rejection_sampler import rejection_sample

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(config: EngineConfig, device: torch.device) -> CausalLM:
    """Build the model on the meta device, then stream weights into freshly allocated storage. Names and shapes
    are checked before the first tensor is read, and a model is returned only once every tensor is in place."""
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
        model = registry.build(model_config)
    model = model.to(dtype).to_empty(device=device)
    _copy_weights(model, weights, source=path)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build_cache(device)
    return model.eval()


def _copy_weights(model: CausalLM, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Copy checkpoint tensors (Hugging Face names) into the model, each into its slice of a stacked parameter
    (q/k/v, gate/up, experts) where the family stacks it."""
    layout, params = registry.layout(model.config), dict(model.named_parameters())
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
            dest.copy_(tensor)
        filled.add(name)
    missing = [n for n in layout if n not in filled]
    if missing:
        raise WeightLoadError(f"{source}: missing tensor(s) {', '.join(missing[:5])}")


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


def num_kv_blocks(cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    return max(1, cache.memory_budget_bytes // kv_bytes_per_block(cfg, cache.block_size, dtype))


@dataclass
class LaunchedStep:
    """A step whose kernels are queued. The runner's contract back to the engine: `wait()` gives per scheduled
    request None (no token this step) or its new tokens."""

    rows: list[int | None]  # per scheduled request: its row among the sampled ones, None if it samples nothing
    samples: DeviceSamples | None = None  # plain sampling of the sampled rows, still on its way to the host
    verdicts: list[list[SampleResult]] | None = None  # speculative verdicts per sampled row (already on the host)
    done: torch.cuda.Event | None = None  # after the forward of a CUDA step that samples nothing

    def wait(self) -> list[list[SampleResult] | None]:
        """The new tokens per scheduled request, once the step's own kernels have finished on the device (not
        work queued after them): when the engine frees blocks after a step, no kernel of it still writes them."""
        if self.done is not None:
            self.done.synchronize()
        if self.verdicts is not None:
            per = self.verdicts
        else:
            per = [[r] for r in self.samples.results()] if self.samples is not None else []
        return [None if i is None else per[i] for i in self.rows]

    def select(self, requests: list[int]) -> LaunchedStep:
        """The same launched work seen by a later step that schedules only these of its requests."""
        return LaunchedStep([self.rows[i] for i in requests], self.samples, self.verdicts, self.done)

    def input_ids_for(self, requests: list[int]) -> torch.Tensor:
        """The device tokens sampled for these scheduled requests, as the next step's input ids (no host sync)."""
        assert self.samples is not None and self.samples.tokens is not None, "nothing was sampled on the device"
        rows = [self.rows[i] for i in requests]
        tokens = self.samples.tokens
        if rows == list(range(tokens.shape[0])):
            return tokens
        return tokens[row_tensor(rows, tokens.device, torch.long)]


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
            spec = config.speculative
            self.graphs.capture(verify_q=1 + spec.num_speculative_tokens if spec else 0)
        log.info("model %s: %d layers, KV cache %d blocks x %d tokens (%.1f MiB), attention=%s",
                 config.model, cfg.num_layers, num_blocks, config.cache.block_size,
                 self.kv_cache.numel() * dtype.itemsize / 2**20, self.attn.name)

    def prepare_speculation(self, num_speculative_tokens: int) -> None:
        """Capture verification graphs for 1 + k tokens per request (decode graphs exist already)."""
        if self.graphs is not None and num_speculative_tokens:
            self.graphs.capture(verify_q=1 + num_speculative_tokens)

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, kv: KVCacheManager,
               draft_probs: dict[str, torch.Tensor] | None = None) -> LaunchedStep:
        """Queue the step's kernels and the copy of its sampled tokens; `wait()` on the result gives, per scheduled
        request, None (no token this step) or its new tokens: one sampled token, or with drafts the accepted drafts
        followed by the target's token. Verifying drafts decides acceptance on the host, so a step with drafts has
        waited when this returns. `draft_probs` holds the proposer's distributions q ([k, vocab]) of sampled
        requests whose drafts were sampled, not looked up."""
        samples = [s.samples for s in out.scheduled]
        rows, n = [], 0
        for f in samples:
            rows.append(n if f else None)
            n += f
        logits = self._logits(self._sequences(out, samples), kv)
        if logits is None:  # prompt chunks only: an event stands in for the sampled tokens' copy (see wait())
            done = torch.cuda.Event() if self.device.type == "cuda" else None
            if done is not None:
                done.record()
            return LaunchedStep(rows, done=done)
        sampling = [s for s, f in zip(out.scheduled, samples, strict=True) if f]
        requests = [s.request for s in sampling]
        if any(s.num_spec_tokens for s in sampling):
            drafts = [s.request.spec_token_ids for s in sampling]
            probs = [(draft_probs or {}).get(r.request_id) for r in requests]
            return LaunchedStep(rows, verdicts=rejection_sample(self.sampler, logits, requests, drafts, probs))
        return LaunchedStep(rows, self.sampler.sample_async(logits, requests))

    @torch.inference_mode()
    def launch_decode(self, requests: list[Request], input_ids: torch.Tensor, kv: KVCacheManager,
                      known: Sequence[Request] = ()) -> LaunchedStep:
        """Queue a decode step for requests whose newest token is not appended yet: `input_ids[i]` (on the
        device, just sampled) is the token of requests[i] at position `requests[i].num_tokens`. Rows for the
        `known` requests follow, each computing its last known token (at `num_computed_tokens`)."""
        assert input_ids.shape == (len(requests),), "one input token per request"
        assert all(r.num_tokens - r.num_computed_tokens == 1 for r in known), "known rows decode their last token"
        seqs = [BatchSeq(r.request_id, r.num_tokens, [0], 1) for r in requests]
        seqs += [BatchSeq(r.request_id, r.num_computed_tokens, _token_slice(r, r.num_computed_tokens, r.num_tokens), 1)
                 for r in known]
        logits = self._logits(seqs, kv, input_ids)
        assert logits is not None
        rows, ahead = list(range(len(seqs))), [1] * len(requests) + [0] * len(known)
        return LaunchedStep(rows, self.sampler.sample_async(logits, [*requests, *known], ahead=ahead))

    def _logits(self, seqs: list[BatchSeq], kv: KVCacheManager, input_ids: torch.Tensor | None = None
                ) -> torch.Tensor | None:
        """Forward the batch (a CUDA graph where one fits); logits where sequences want them, None if nowhere.
        `input_ids`, when given, replaces the host token ids of the first len(input_ids) sequences (one token
        each) on the device."""
        if self.graphs is not None:
            q = self.graphs.query_len([len(s.token_ids) for s in seqs], [s.num_logits for s in seqs])
            if q is not None:  # decode, or decode + drafts: every row samples
                return self.graphs.run(seqs, kv, q, input_ids)
        ids, positions, meta, logits_idx = build_batch(seqs, kv, self.device)
        if input_ids is not None:
            ids[: input_ids.shape[0]].copy_(input_ids)
        hidden = self.model(ids, positions, self.kv_cache, meta, self.attn)
        if not len(logits_idx):
            return None
        return self.model.compute_logits(hidden[logits_idx])

    @staticmethod
    def _sequences(out: SchedulerOutput, samples: list[bool]) -> list[BatchSeq]:
        seqs = []
        for s, sampled in zip(out.scheduled, samples, strict=True):
            r = s.request
            start, known_end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens - s.num_spec_tokens
            tokens = _token_slice(r, start, known_end)
            if s.num_spec_tokens:
                tokens = tokens + r.spec_token_ids[: s.num_spec_tokens]
            seqs.append(BatchSeq(r.request_id, start, tokens, 1 + s.num_spec_tokens if sampled else 0))
        return seqs


def _token_slice(r: Request, start: int, end: int) -> list[int]:
    """Tokens [start, end) of prompt + output without concatenating the whole sequence."""
    p = len(r.prompt_token_ids)
    if end <= p:
        return r.prompt_token_ids[start:end]
    if start >= p:
        return r.output_token_ids[start - p : end - p]
    return r.prompt_token_ids[start:] + r.output_token_ids[: end - p]
