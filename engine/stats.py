"""What an engine reports about itself: counters since start (`EngineStats`) and its load now (`EngineLoad`).

Every figure is a dataclass field declared with `stat(help)`. That declaration is the whole schema: a worker
sends every field of these objects (and of its own counters) in its Load report by name, and the router exports
every name it receives as `disagg_worker_<name>` with the help text declared here. Adding a figure is one edit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.scheduler import SchedulerOutput


def stat(help: str, default: float = 0) -> Any:  # noqa: A002 - Prometheus calls it help
    """A reported figure: a dataclass field with its one-line meaning."""
    return field(default=default, metadata={"help": help})


def stat_items(*objects: Any) -> Iterator[tuple[str, float, str]]:
    """(name, value, help) of every `stat` field of the given dataclass instances."""
    for obj in objects:
        for f in fields(obj):
            if "help" in f.metadata:
                yield f.name, float(getattr(obj, f.name)), f.metadata["help"]


@dataclass
class EngineStats:
    """Counters since start: what the engine actually computed."""

    prompt_tokens: int = stat("Prompt tokens run through the model since start (prefix-cache hits excluded, "
                              "recomputes counted again)")
    generation_tokens: int = stat("Tokens sampled since start")
    steps: int = stat("Engine steps since start")
    preemptions: int = stat("Requests preempted (blocks taken back, recomputed later) since start")
    sampling_request_steps: int = stat("(request, step) pairs that gave the request new tokens, since start")
    spec_steps: int = stat("Steps in which the model verified draft tokens, since start")
    spec_verifications: int = stat("(request, step) pairs that verified at least one draft token, since start")
    spec_proposed_tokens: int = stat("Draft tokens verified since start")
    spec_accepted_tokens: int = stat("Draft tokens accepted since start")
    overlap_steps_queued: int = stat("Decode steps queued before the previous step's tokens were read, since start")
    overlap_steps_used: int = stat("Queued-ahead decode steps the next schedule used (the others were wasted "
                                   "passes), since start")
    overlap_joins_delayed: int = stat("Requests joining the batch one step later, inside a queued-ahead step, "
                                      "since start")
    overlap_steps_split: int = stat("Queued-ahead steps used with new prompt chunks run right after them as a "
                                    "second forward, since start")
    recomputes: int = stat("Requests that arrived with tokens sampled elsewhere but without their KV (a failed or "
                           "timed-out KV pull, a migrated request), so their prompt was recomputed here, since start")
    remote_kv_timeouts: int = stat("KV pulls the engine stopped waiting for at their deadline, since start")
    leases_expired: int = stat("Leased KV (finished prompts kept for a decode worker) freed unclaimed at its "
                               "deadline, since start")
    launch_seconds: float = stat("Host seconds spent queueing steps' model work (after scheduling; on a GPU the "
                                 "kernel launches), since start")
    wait_seconds: float = stat("Host seconds spent waiting for steps' results (on a GPU, for the device), since start")
    cpu_threads: int = stat("CPU engines: threads the last step ran on (engine.cpu_threads adaptive: the cores the "
                            "rest of the machine left idle)")
    cpu_thread_changes: int = stat("CPU engines: times the thread count changed, since start")

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 before any proposal)."""
        return self.spec_accepted_tokens / self.spec_proposed_tokens if self.spec_proposed_tokens else 0.0

    @property
    def mean_tokens_per_step(self) -> float:
        """New tokens a request gets per step that gives it any: 1 without speculation, up to k + 1 with it."""
        return self.generation_tokens / self.sampling_request_steps if self.sampling_request_steps else 0.0

    @property
    def mean_tokens_per_verification(self) -> float:
        """Tokens per (request, step) that verified drafts: 1 + accepted drafts, before stop truncation."""
        return 1 + self.spec_accepted_tokens / self.spec_verifications if self.spec_verifications else 0.0


@dataclass(frozen=True)
class EngineLoad:
    """The engine's load at one moment, read between steps."""

    num_waiting: int = stat("Requests queued on the worker")
    num_running: int = stat("Requests running on the worker")
    num_receiving_kv: int = stat("Requests waiting for their prompt's KV from another worker")
    leased_requests: int = stat("Finished prompts whose KV the worker keeps for a decode worker to pull")
    kv_blocks_quarantined: int = stat("KV blocks kept from reuse until a transfer into them has stopped")
    queued_prefill_tokens: int = stat("Prompt tokens waiting to be prefilled on the worker")
    kv_blocks_total: int = stat("KV blocks of the worker's cache")
    kv_blocks_free: int = stat("Free KV blocks on the worker")
    kv_usage: float = stat("Fraction of the worker's KV blocks in use")
    kv_cached_blocks: int = stat("Full KV blocks in the worker's prefix cache")
    prefix_query_tokens: int = stat("Prompt tokens the worker looked up in its prefix cache since start")
    prefix_hit_tokens: int = stat("Prompt tokens the worker found in its prefix cache since start")


@dataclass(frozen=True)
class StepShape:
    """What one step computes, in the terms of a step-time model (simulator/cost_model.py): prompt tokens (chunks
    of one or more prompts) with their attention pairs, and decode rows with their mean cached context."""

    prompt_tokens: int  # tokens of prompt chunks (a recomputed request's sampled tokens, and a row verifying
    # draft tokens, count as a chunk: the cost model has no separate term for either)
    pairs: float  # (new token, earlier or same token) pairs those chunks attend over
    decode_rows: int  # requests computing one token after all they know is cached
    decode_context: float  # the decode rows' mean cached tokens (0 without rows)
    # requests whose prompt chunks make up `prompt_tokens`: a serving worker's step costs more with each (an H100
    # prefill worker's two- and three-prompt steps ran 6-14 ms over a price per step, benchmarks/RESULTS.md)
    prompts: int = 0

    @classmethod
    def of(cls, out: SchedulerOutput) -> StepShape:
        """The shape of a step as scheduled (before `Scheduler.update` moves the computed counts on)."""
        prompt = rows = prompts = 0
        pairs = context = 0.0
        for s in out.scheduled:
            r, n = s.request, s.num_new_tokens
            done = r.num_computed_tokens
            if n == 1 and done + 1 == r.num_tokens and done >= len(r.prompt_token_ids):
                rows += 1
                context += done
            else:
                prompt += n
                prompts += 1
                pairs += n * (n + 1) / 2 + n * done
        return cls(prompt, pairs, rows, context / rows if rows else 0.0, prompts)
