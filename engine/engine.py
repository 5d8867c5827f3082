"""The engine core: requests in, token deltas out, one `step()` at a time. No networking, no text.

`LLMEngine`'s public methods are the whole API the workers use (tests/test_seams.py checks that nothing outside
engine/ reaches past them): requests (`make_request`, `add`, `add_request`, `abort`), stepping (`step`,
`check_deadlines`), remote KV (`receive_kv`, `kv_received`, `kv_failed`, `lease`, `release_lease`; see
engine/remote_kv.py for who owns which block when), what the engine reports (`stats`, `load`,
`drain_kv_events`, `kv_cache`, `cached_prefix_tokens`), and its tensor-parallel ranks (`kv_layout`, `run_on_ranks`,
`close`; docs/parallel.md).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.block_pool import KVEvent
from engine.config import EngineConfig, ModelConfig, SpeculativeConfig
from engine.cpu_threads import cpu_threads_for
from engine.fork import PromptForks
from engine.grammar import trim_drafts
from engine.grammar_compiler import GrammarCompiler, model_tokenizer, tokenizer_available
from engine.kv_cache_manager import KVCacheManager, cdiv
from engine.kv_progress import LayerProgress
from engine.lookahead import Lookahead
from engine.model_runner import DTYPES, ModelRunner, num_kv_blocks
from engine.parallel.kv_heads import KVHeadLayout
from engine.prompt_logprobs import take as take_prompt_logprobs
from engine.remote_kv import KVLease, KVProgress, KVReservation, RemoteKV
from engine.request import FinishReason, InvalidRequestError, PromptLogprob, Request, RequestStatus, SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.spec_decode import build_proposer
from engine.stats import EngineLoad, EngineStats, StepShape

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What one step did for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    new_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    # params.prompt_logprobs, in the request's first output only: None for the first prompt token, then one record
    # per prompt token (engine/prompt_logprobs.py). None otherwise, or when its prompt was not computed here.
    prompt_logprobs: list[PromptLogprob | None] | None = None


class LLMEngine:
    """Owns the model runner, the KV cache manager, the scheduler and the requests in flight."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        probe = _probe_model_config(config)
        num_blocks = num_kv_blocks(probe, config.cache, DTYPES[config.dtype], config.tensor_parallel_size)
        self.max_model_len = min(config.max_model_len or probe.max_position_embeddings, probe.max_position_embeddings)
        self._runner = ModelRunner(config, self.device, num_blocks, self.max_model_len)
        self.model_config: ModelConfig = self._runner.model_config
        self._kv = KVCacheManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self._scheduler = Scheduler(config.scheduler, self._kv, self.max_model_len, self.model_config.eos_token_ids,
                                    kv_window=self.model_config.kv_window)
        self._requests: dict[str, Request] = {}
        eos = self.model_config.eos_token_ids
        self._runner.sampler.eos_token_ids = eos  # min_tokens bans them
        # Structured outputs: grammars compiled against the model's tokenizer (loaded on the first one), cached.
        self._grammars = GrammarCompiler(lambda: model_tokenizer(config.model, config.load_format),
                                         self.model_config.vocab_size, eos,
                                         available=tokenizer_available(config.model, config.load_format))
        # n > 1: a choice naming a sibling in params.fork_from shares its prompt's KV (engine/fork.py).
        self._scheduler.forks = PromptForks(self._kv, self._requests.get, self._runner.copy_blocks)  # every rank's
        self.stats = EngineStats()
        self._remote = RemoteKV(self._kv, self._scheduler, self.model_config.num_layers, self.stats)
        self._progress = LayerProgress(self.model_config.num_layers, self.device)
        # Hooked now, not at the first prefill-role request: a hook added while a step runs on the engine thread
        # would change the layers' hook dicts under that forward.
        self._progress.attach(self._runner.model.model.layers)
        self._threads = cpu_threads_for(config, self.device)
        if self._threads is not None:  # hooked now for the same reason as the progress hooks above
            self._threads.attach(self._runner.model.model.layers)
        self._lookahead = Lookahead(self._runner, self._kv, self._scheduler, self.stats,
                                    config.overlaps_steps(self.device.type == "cuda"))
        self.set_speculative(config.speculative)
        self._step_observer: Callable[[StepShape], None] | None = None

    def set_speculative(self, spec: SpeculativeConfig | None) -> None:
        """Turn speculative decoding on, off or to another proposer, keeping the loaded target model.
        Only while no request is in flight."""
        if self._requests:
            raise RuntimeError("cannot change speculative decoding while requests are in flight")
        self.config = dataclasses.replace(self.config, speculative=spec)
        self._lookahead.drop()
        self._proposer = build_proposer(self.config, self._runner, self._kv.num_blocks, self.max_model_len)
        self._scheduler.num_spec_tokens = spec.num_speculative_tokens if self._proposer is not None and spec else 0
        self._runner.prepare_speculation(self._scheduler.num_spec_tokens)

    # ---- what the engine is ----------------------------------------------------------------------------------
    @property
    def kv_cache(self) -> torch.Tensor:
        """The paged KV cache, [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] (transfer agents
        register it; docs/architecture.md "KV cache layout"). Under tensor parallelism: rank 0's shard, its KV heads
        only (`kv_layout()`; every rank's shard through `run_on_ranks`)."""
        return self._runner.kv_cache

    def kv_layout(self) -> KVHeadLayout:
        """Which KV heads each tensor-parallel rank's cache holds (one rank: all): what a KV handshake carries."""
        return self._runner.layout

    def run_on_ranks(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """fn(RankKV, *args) on every tensor-parallel rank, in its process, with its KV cache shard (a transfer
        agent per rank registers its shard this way); results in rank order. `fn` and `args` are pickled: a
        module-level function. Call between steps."""
        return self._runner.run_on_ranks(fn, *args)

    def close(self) -> None:
        """Stop the other tensor-parallel ranks' processes (nothing to do with one rank) and give back this engine's
        slot in the CPU share, if it holds one; idempotent."""
        self._runner.close()
        if self._threads is not None:
            self._threads.close()

    @property
    def num_kv_blocks(self) -> int:
        return self._kv.num_blocks

    @property
    def uses_cuda_graphs(self) -> bool:
        return self._runner.graphs is not None

    # ---- requests -------------------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError if the request can never be served."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < vocab)), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})")
        bad = next((t for t in params.token_ids_in_vocab if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"sampling parameters name token id {bad} outside the vocabulary [0, {vocab})")
        if params.structured_output:
            self._grammars.check(params.structured_output)  # parses (ms); compiles in the background later
        if n + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens, but {n + params.max_tokens} "
                f"were requested ({n} in the prompt, {params.max_tokens} for the completion)")
        need = cdiv(n + params.max_tokens, self._kv.block_size)
        window = self.model_config.kv_window
        if window is not None:  # blocks before the window are released as it runs (Scheduler.kv_window)
            step = self.config.scheduler.max_num_batched_tokens + self._scheduler.num_spec_tokens
            need = min(need, cdiv(step + window - 1, self._kv.block_size) + 1)
        if need > self._kv.num_blocks:
            raise InvalidRequestError(f"request needs {need} KV blocks but the cache only has {self._kv.num_blocks}")

    def make_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams, *,
                     output_token_ids: Sequence[int] = (), lease_s: float | None = None) -> Request:
        """A checked request, not yet queued (raises InvalidRequestError). Pure: callable from any thread.
        `output_token_ids`: tokens already sampled elsewhere (the request resumes after them). `lease_s`: prefill
        role, hand off after the first token and lease the KV this long (engine/remote_kv.py)."""
        self.validate(prompt_token_ids, params)
        req = Request(request_id, list(prompt_token_ids), params, arrival_time=time.monotonic(), lease_s=lease_s)
        req.output_token_ids.extend(output_token_ids)
        if params.structured_output:  # compiled once, in the background; the request waits for it (scheduler)
            req.grammar = self._grammars.state(params.structured_output, req.output_token_ids)
        return req

    def add(self, req: Request) -> None:
        """Queue a request made by `make_request`. A request with tokens sampled elsewhere but no KV here is a
        recompute (counted)."""
        self._claim_id(req.request_id)
        self._requests[req.request_id] = req
        self.stats.recomputes += bool(req.output_token_ids)
        self._scheduler.add(req)

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams, *,
                    output_token_ids: Sequence[int] = (), lease_s: float | None = None) -> Request:
        """`make_request` + `add`."""
        req = self.make_request(request_id, prompt_token_ids, params, output_token_ids=output_token_ids,
                                lease_s=lease_s)
        self.add(req)
        return req

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks (or its lease); False if it is unknown or already finished.
        A request receiving KV ends at once; its blocks are freed when the transfer reports its end."""
        req = self._requests.pop(request_id, None)
        if req is None or req.is_finished:
            return self._remote.release(request_id)
        self._progress.forget(request_id)
        if req.status == RequestStatus.RECEIVING_KV:
            self._remote.abort(req)
        else:
            self._lookahead.before_free(req)  # its blocks go back now: no queued write may land in them later
            self._scheduler.finish(req, FinishReason.ABORT)
        if self._proposer is not None:
            self._proposer.remove(request_id)
        if not self.has_unfinished():
            self._threads_idle()
        return True

    def has_unfinished(self) -> bool:
        """Whether `step()` has work: requests waiting or running (receiving ones wait for their KV first)."""
        return self._scheduler.has_unfinished

    @property
    def num_requests(self) -> int:
        """Requests in flight: waiting, running or receiving KV (leased ones have finished)."""
        return len(self._requests)

    def _claim_id(self, request_id: str) -> None:
        if request_id in self._requests:
            raise InvalidRequestError(f"duplicate request id {request_id!r}")
        if self._kv.has(request_id):
            raise InvalidRequestError(f"request id {request_id!r} still holds KV blocks")

    # ---- remote KV (engine/remote_kv.py) -----------------------------------------------------------------------
    def receive_kv(self, req: Request, num_tokens: int, timeout_s: float) -> KVReservation | None:
        """Register `req` (from `make_request`) as receiving the KV of its first `num_tokens` tokens from
        elsewhere and reserve its blocks; None (nothing registered) when blocks are short. Report the transfer's
        end with `kv_received` or `kv_failed`; past `timeout_s` the engine recomputes the prompt instead."""
        self._claim_id(req.request_id)
        res = self._remote.receive(req, num_tokens, timeout_s)
        if res is not None:
            self._requests[req.request_id] = req
        return res

    def kv_received(self, request_id: str, layers: range | list[int] | None = None,
                    output_token_ids: Sequence[int] = ()) -> None:
        """These layers' KV (None: all) sits in the reserved blocks and no transfer writes them any more.
        `output_token_ids`: tokens sampled elsewhere the request continues after, if `make_request` lacked them
        (layer-wise streaming learns the prefill's first token last)."""
        self._remote.received(request_id, layers, output_token_ids)

    def kv_failed(self, request_id: str) -> None:
        """The transfer ended without the KV and writes no more: the prompt is recomputed here."""
        self._remote.failed(request_id)

    def lease(self, request_id: str) -> KVLease | None:
        """The lease of a request that handed off (prefill role); None if it has none (any more)."""
        return self._remote.leases.get(request_id)

    def kv_progress(self, request_id: str) -> KVProgress | None:
        """How far a prefill-role request's KV is written, layer by layer (engine/kv_progress.py), while it runs
        and while its lease lasts; None before it is admitted or once it ended without a lease (or was released).
        Safe to call from any thread: it reads only fields written whole."""
        lease = self._remote.leases.get(request_id)
        if lease is not None:
            return KVProgress(lease.block_ids, lease.num_tokens, (lease.num_tokens,) * self.model_config.num_layers,
                              lease.first_token)
        layers = self._progress.layer_tokens(request_id)
        req = self._requests.get(request_id)
        if layers is None or req is None:
            return None
        blocks = tuple(self._kv.block_table(request_id))[: cdiv(req.num_prompt_tokens, self._kv.block_size)]
        return KVProgress(blocks, req.num_prompt_tokens, layers)

    def release_lease(self, request_id: str) -> bool:
        """Free a leased request's blocks now (its KV was pulled); False if it holds no lease."""
        return self._remote.release(request_id)

    def check_deadlines(self) -> None:
        """Recompute receipts past their deadline, free leases past theirs. `step()` does it too; an idle
        worker's loop calls it. RankFailedError when a tensor-parallel rank has died (the worker goes unhealthy)."""
        self._runner.check_ranks()
        self._remote.expire()

    def cached_prefix_tokens(self, token_ids: Sequence[int]) -> int:
        """Tokens of `token_ids`' leading full blocks this engine's prefix cache holds (read-only lookup)."""
        return len(self._kv.lookup_prefix(list(token_ids))[0]) * self._kv.block_size

    # ---- stepping ------------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Schedule, run the model, sample, and report what each request got."""
        self.check_deadlines()
        out = self._scheduler.schedule()
        self.stats.preemptions += len(out.preempted)
        if out.is_empty:
            self._threads_idle()
            return []
        if self._threads is not None:
            self.stats.cpu_threads = self._threads.apply()
            self.stats.cpu_thread_changes = self._threads.changes
        draft_probs = None
        if self._proposer is not None:
            draft_probs = self._proposer.propose(out, self._kv)
            trim_drafts(out.scheduled, draft_probs)  # a grammar's request verifies only drafts it allows
            self._scheduler.apply_proposals(out)
        for rid in out.preempted:  # its blocks went back: a puller must start over (new block ids)
            self._progress.forget(rid)
        if self._step_observer is not None:
            self._step_observer(StepShape.of(out))
        began = time.perf_counter()
        self._progress.begin(out)
        launched = self._lookahead.launch(out, draft_probs)
        self._progress.end()
        queued = time.perf_counter()
        sampled = launched.wait()
        self.stats.launch_seconds += queued - began
        self.stats.wait_seconds += time.perf_counter() - queued
        self._count_prompt_tokens(out)
        self._scheduler.update(out, sampled)
        self.stats.steps += 1
        self._count_spec(out)
        results = [r for s in out.scheduled if (r := self._output(s)) is not None]
        self._lookahead.after_step()  # see engine/lookahead.py: blocks freed under a queued write
        if not self.has_unfinished():
            self._threads_idle()
        return results

    def observe_steps(self, observer: Callable[[StepShape], None] | None) -> None:
        """Call `observer` with each step's shape as the step is launched (None: stop). For benchmarks that hold
        step times against a cost model (benchmarks/step_replay.py); nothing is computed without one."""
        self._step_observer = observer

    def _threads_idle(self) -> None:
        """No step is coming: the other engines of the machine may take this one's cores (engine/cpu_threads.py)."""
        if self._threads is not None:
            self._threads.idle()

    def _output(self, s) -> StepOutput | None:  # noqa: ANN001 - ScheduledRequest
        r, n = s.request, s.num_output_tokens
        self.stats.generation_tokens += n
        self.stats.sampling_request_steps += n > 0
        finished = r.status == RequestStatus.FINISHED
        if not (n or finished):
            return None
        if finished:
            self._requests.pop(r.request_id, None)
            if r.finish_reason == FinishReason.HANDOFF:
                self._remote.grant(r)
            self._progress.forget(r.request_id)
            if self._proposer is not None:
                self._proposer.remove(r.request_id)
        return StepOutput(r.request_id, r.output_token_ids[-n:] if n else [], finished,
                          r.finish_reason.value if r.finish_reason else None, r.stop_reason,
                          r.logprobs[-s.num_logprobs:] if s.num_logprobs else [], take_prompt_logprobs(r))

    def _count_prompt_tokens(self, out: SchedulerOutput) -> None:
        for s in out.scheduled:
            r, start = s.request, s.request.num_computed_tokens
            if start < len(r.prompt_token_ids):
                self.stats.prompt_tokens += min(start + s.num_new_tokens, len(r.prompt_token_ids)) - start

    def _count_spec(self, out: SchedulerOutput) -> None:
        verified = [s for s in out.scheduled if s.num_spec_tokens]
        if verified:
            self.stats.spec_steps += 1
            self.stats.spec_verifications += len(verified)
            self.stats.spec_proposed_tokens += sum(s.num_spec_tokens for s in verified)
            self.stats.spec_accepted_tokens += sum(s.num_accepted_tokens for s in verified)

    # ---- what the engine reports -----------------------------------------------------------------------------
    def load(self) -> EngineLoad:
        """The load now. Call between steps (it reads the queues)."""
        s, kv = self._scheduler, self._kv
        queued = sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in [*s.waiting, *s.running])
        return EngineLoad(
            num_waiting=len(s.waiting), num_running=len(s.running), num_receiving_kv=len(self._remote.receipts),
            leased_requests=len(self._remote.leases), kv_blocks_quarantined=self._remote.num_quarantined_blocks,
            queued_prefill_tokens=queued, kv_blocks_total=kv.num_blocks, kv_blocks_free=kv.num_free_blocks,
            kv_usage=kv.usage(), kv_cached_blocks=kv.pool.num_cached, prefix_query_tokens=kv.query_tokens,
            prefix_hit_tokens=kv.hit_tokens)

    def drain_kv_events(self) -> list[KVEvent]:
        """Prefix-cache events (block hash stored / evicted) since the last call. Call between steps."""
        return self._kv.pool.drain_events()


def _probe_model_config(config: EngineConfig):  # noqa: ANN202 - ModelConfig
    from engine.loader import load_model_config, resolve_source

    if config.load_format == "dummy":
        return config.dummy_model
    fmt, path = resolve_source(config.model, config.load_format)
    return load_model_config(fmt, path)
