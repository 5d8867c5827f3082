"""One simulated request: its lengths, where it is, and the times the router saw its tokens."""

from __future__ import annotations

from typing import Any


class SimRequest:
    """A request as the router and one replica at a time see it.

    Token counts follow the engine's rule (engine/scheduler.py): the request knows `prompt + generated` tokens, of
    which `computed` have their KV on the replica holding it; a step computes some of the rest and, once all are
    computed, samples one more. While it decodes on a replica, `generated` and `computed` are kept implicitly by the
    replica's step counter (`join_step`, `join_generated`, `join_context`) and made explicit when it leaves.
    """

    __slots__ = ("rid", "arrival", "prompt", "output", "computed", "generated", "blocks", "lease_blocks", "epoch",
                 "join_step", "join_generated", "join_context", "join_blocks", "seg_index",
                 "t_first", "t_second", "first_gap", "prefill_ctx", "decode_ctx", "prefill_at", "recomputes",
                 "stream", "stream_blocks", "stream_end", "marks")

    def __init__(self, rid: int, arrival: float, prompt: int, output: int) -> None:
        self.rid = rid  # sequence number in the workload
        self.arrival = arrival  # seconds since the start of the run
        self.prompt = prompt  # prompt tokens
        self.output = max(1, output)  # output tokens wanted (the first comes from the prefill)
        self.computed = 0  # tokens whose KV sits on the current replica
        self.generated = 0  # output tokens sampled so far
        self.blocks = 0  # KV blocks it holds on the current replica (outside the decode set's accounting)
        self.lease_blocks = 0  # KV blocks its prefill replica keeps for the pull (held while the decode side fills)
        self.epoch = 0  # bumped whenever it joins a decode set: older finish-heap entries are stale
        self.join_step = 0  # the replica's step counter when it joined the decode set
        self.join_generated = 0  # its `generated` then
        self.join_context = 0  # its `computed` then
        self.join_blocks = 0  # its blocks then
        self.seg_index = 0  # index of the replica's first step segment after it joined (for its inter-token gaps)
        self.t_first = -1.0  # when the router had its first token (TTFT = t_first - arrival); -1: not yet
        self.t_second = -1.0  # when its first decode step ended on the decode replica
        self.first_gap = 0.0  # seconds between its first and second token at the router
        self.prefill_ctx: Any = None  # the router's in-flight count on its prefill worker (WorkerState.dispatched)
        self.decode_ctx: Any = None  # ... on its decode worker
        self.prefill_at: Any = None  # the prefill replica that holds (leases) its KV until the pull ends
        self.stream: Any = None  # layer-wise streaming: the decode replica pulling its KV while the prefill runs
        self.stream_blocks = 0  # ... the blocks it holds there for it (0: not reserved yet)
        self.stream_end = -1.0  # when its prefill ended (the last layer group written); -1: not yet
        self.recomputes = 0  # times its prompt was recomputed (preempted, or no blocks for the pull)
        # with keep_requests: when its handoff passed each point (metrics.HANDOFF_MARKS, as the workers' step logs
        # mark them); None: not kept
        self.marks: dict[str, float] | None = None

    @property
    def need(self) -> int:
        """Tokens to compute before it samples its next token."""
        return self.prompt + self.generated - self.computed
