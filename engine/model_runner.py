"""SchedulerOutput -> flat tensors -> model -> sampler.

The runner owns the model shard (weights, KV cache tensor, attention backend, CUDA graphs: engine/model_shard.py)
and the sampler. Everything it needs about a step comes from the `SchedulerOutput` and the KV cache manager's
block tables; it keeps no per-request state.

With speculative decoding a request's new tokens end with its draft tokens
(`request.spec_token_ids`); the runner then takes logits at its last known
position and at every draft position, and the rejection sampler turns them
into the accepted drafts plus one token of the target's.

Under tensor parallelism (engine.tensor_parallel_size > 1, docs/parallel.md) the runner is rank 0: it starts the
other ranks (engine/parallel/ranks.py), sends each of them every forward it runs (one step message), runs its own
shard, and samples from the logits gathered from all ranks. Nothing else about a step changes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.batch import BatchSeq
from engine.config import EngineConfig
from engine.kv_cache_manager import KVCacheManager
from engine.model_shard import DTYPES, ModelShard, kv_bytes_per_block, load_model, model_config_of, num_kv_blocks
from engine.models.parallel import check_divisible
from engine.parallel import step as msg
from engine.parallel.group import SINGLE
from engine.parallel.kv_heads import RankKV, kv_layout
from engine.parallel.ranks import RankProcesses, run_everywhere
from engine.parallel.step import StepTables
from engine.prompt_logprobs import PromptLogprobs, prompt_spans, split_logits
from engine.request import Request
from engine.sampler import DeviceSamples, Sampler, SampleResult, row_tensor
from engine.scheduler import SchedulerOutput
from engine.spec_decode.rejection_sampler import rejection_sample

log = logging.getLogger(__name__)

__all__ = ["DTYPES", "LaunchedStep", "ModelRunner", "kv_bytes_per_block", "load_model", "num_kv_blocks"]


@dataclass
class LaunchedStep:
    """A step whose kernels are queued. The runner's contract back to the engine: `wait()` gives per scheduled
    request None (no token this step) or its new tokens."""

    rows: list[int | None]  # per scheduled request: its row among the sampled ones, None if it samples nothing
    samples: DeviceSamples | None = None  # plain sampling of the sampled rows, still on its way to the host
    verdicts: list[list[SampleResult]] | None = None  # speculative verdicts per sampled row (already on the host)
    done: torch.cuda.Event | None = None  # after the forward of a CUDA step that samples nothing
    prompt: PromptLogprobs | None = None  # prompt logprobs of the step's prompt chunks that asked for them

    def wait(self) -> list[list[SampleResult] | None]:
        """The new tokens per scheduled request, once the step's own kernels have finished on the device (not
        work queued after them): when the engine frees blocks after a step, no kernel of it still writes them.
        Requests that asked for prompt logprobs get this step's records appended (engine/prompt_logprobs.py)."""
        if self.done is not None:
            self.done.synchronize()
        if self.prompt is not None:
            self.prompt.record()
            self.prompt = None
        if self.verdicts is not None:
            per = self.verdicts
        else:
            per = [[r] for r in self.samples.results()] if self.samples is not None else []
        return [None if i is None else per[i] for i in self.rows]

    def select(self, requests: list[int]) -> LaunchedStep:
        """The same launched work seen by a later step that schedules only these of its requests."""
        return LaunchedStep([self.rows[i] for i in requests], self.samples, self.verdicts, self.done, self.prompt)

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
        dtype = DTYPES[config.dtype]
        self.ranks: RankProcesses | None = None
        if config.tensor_parallel_size > 1:
            check_divisible(model_config_of(config), config.tensor_parallel_size)  # before starting any rank
            self.ranks = RankProcesses(config, device, num_blocks, max_model_len)
        try:
            self.shard = ModelShard(config, device, num_blocks, max_model_len, self.ranks.group if self.ranks else SINGLE)
            if self.ranks is not None:
                self.ranks.wait_ready()
            spec = config.speculative
            self._capture(1 + spec.num_speculative_tokens if spec else 0)
        except BaseException:
            self.close()
            raise
        self.model, self.kv_cache, self.attn, self.graphs = (self.shard.model, self.shard.kv_cache, self.shard.attn,
                                                             self.shard.graphs)
        cfg = self.model_config = self.shard.model_config
        self.layout = kv_layout(config, cfg, num_blocks)
        self._rank0 = RankKV(0, self.layout, self.kv_cache)
        self.sampler = Sampler(config.seed)
        log.info("model %s: %d layers, KV cache %d blocks x %d tokens (%.1f MiB per rank), attention=%s, %d rank(s)",
                 config.model, cfg.num_layers, num_blocks, config.cache.block_size,
                 self.kv_cache.numel() * dtype.itemsize / 2**20, self.attn.name, config.tensor_parallel_size)

    def prepare_speculation(self, num_speculative_tokens: int) -> None:
        """Capture verification graphs for 1 + k tokens per request (decode graphs exist already)."""
        if self.graphs is not None and num_speculative_tokens:
            self._capture(1 + num_speculative_tokens)

    def _capture(self, verify_q: int) -> None:
        if self.shard.graphs is None and not self.shard.jit_kernels:  # nothing to capture or warm up
            return
        with self._together():
            if self.ranks is not None:
                self.ranks.send_control(msg.CAPTURE, verify_q)
            self.shard.capture(verify_q)

    # ---- tensor parallelism: what the engine exposes ---------------------------------------------------------
    def run_on_ranks(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """fn(RankKV, *args) on every rank (rank 0 here, the others in their processes), results in rank order."""
        if self.ranks is None:
            return [fn(self._rank0, *args)]
        return run_everywhere(self.ranks, fn, args, lambda: fn(self._rank0, *args))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks src -> dst on every rank."""
        with self._together():
            if self.ranks is not None and pairs:
                self.ranks.send_control(msg.COPY, list(pairs))
            self.shard.copy_blocks(pairs)

    def check_ranks(self) -> None:
        """RankFailedError if a rank of a tensor-parallel engine has died (nothing to check on one rank)."""
        if self.ranks is not None:
            self.ranks.check()

    def close(self) -> None:
        """Stop the other ranks (idempotent)."""
        if self.ranks is not None:
            self.ranks.close()

    def _together(self) -> contextlib.AbstractContextManager[None]:
        return self.ranks.step_guard() if self.ranks is not None else contextlib.nullcontext()

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
        seqs = self._sequences(out, samples)
        spec = [s.num_spec_tokens for s in out.scheduled]
        spans = prompt_spans([s.request for s in out.scheduled], seqs, spec)
        logits = self._logits(seqs, kv)
        prompt = None
        if spans:  # only a step with a request asking for prompt logprobs: its logits hold their rows too
            assert logits is not None
            logits, prompt = split_logits(logits, seqs, spec, samples, spans)
        if logits is None:  # prompt chunks only: an event stands in for the sampled tokens' copy (see wait())
            done = torch.cuda.Event() if self.device.type == "cuda" else None
            if done is not None:
                done.record()
            return LaunchedStep(rows, done=done, prompt=prompt)
        sampling = [s for s, f in zip(out.scheduled, samples, strict=True) if f]
        requests = [s.request for s in sampling]
        if any(s.num_spec_tokens for s in sampling):
            drafts = [s.request.spec_token_ids for s in sampling]
            probs = [(draft_probs or {}).get(r.request_id) for r in requests]
            return LaunchedStep(rows, verdicts=rejection_sample(self.sampler, logits, requests, drafts, probs),
                                prompt=prompt)
        return LaunchedStep(rows, self.sampler.sample_async(logits, requests), prompt=prompt)

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

    def draft_logits(self, seqs: list[BatchSeq], kv: KVCacheManager, num_layers: int) -> torch.Tensor:
        """Logits of the first `num_layers` layers (+ final norm + LM head) where the sequences want them, writing
        those layers' KV: the self-speculation draft (engine/spec_decode/self_draft.py), on every rank."""
        logits = self._logits(seqs, kv, num_layers=num_layers)
        assert logits is not None, "a draft pass wants logits"
        return logits

    def _logits(self, seqs: list[BatchSeq], kv: KVCacheManager, input_ids: torch.Tensor | None = None,
                num_layers: int | None = None) -> torch.Tensor | None:
        """Forward the batch (a CUDA graph where one fits); logits where sequences want them, None if nowhere.
        `input_ids`, when given, replaces the host token ids of the first len(input_ids) sequences (one token
        each) on the device. Under tensor parallelism every rank runs the same forward, told by one message."""
        q = self.shard.graph_query_len(seqs) if num_layers is None else None
        if self.ranks is None:
            return self.shard.logits(seqs, kv, input_ids, q, num_layers)
        tables = StepTables(kv.table_array.gather([s.request_id for s in seqs]), kv.block_size)
        with self.ranks.step_guard():
            self.ranks.send_step(seqs, tables.tables, q, num_layers, input_ids)
            return self.shard.logits(seqs, tables, input_ids, q, num_layers)

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

