"""n > 1: the choices of one prompt share its KV instead of each computing it.

The router sends each choice as its own request; every choice but the first names the first in
`params.fork_from` (the *source*). The scheduler holds such a request back while its source is still computing
the prompt (waiting, receiving its KV from a prefill worker, or part-way through a chunked prefill), then forks it
from the source: the blocks wholly before the prompt's last token are shared (ref count + 1, never written again:
they hold computed tokens), the block holding the last token is copied into a fresh one (copy-on-write: the
source goes on writing its own copy). The forked request then computes only the prompt's last token, whose
logits give its first token, so each choice samples its own.

A request whose source is unknown here (finished, aborted, on another worker) or has another prompt, or that has
output tokens already (a choice resumed after a migration), is computed as usual; the prefix cache may still
share its full blocks. A request asking for prompt logprobs never forks: it computes every prompt position itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus


def copy_blocks(kv_cache: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    """Copy whole KV blocks (every layer, K and V) `src -> dst` on the cache's device, queued on its stream after
    any step already launched (which may still write other positions of `src`, never the copied ones)."""
    if not pairs:
        return
    from engine.sampler import row_tensor

    src = row_tensor([a for a, _ in pairs], kv_cache.device, torch.long)
    dst = row_tensor([b for _, b in pairs], kv_cache.device, torch.long)
    kv_cache.index_copy_(0, dst, kv_cache.index_select(0, src))


class PromptForks:
    """The scheduler's view of n > 1: which waiting requests wait for a sibling, and the fork itself."""

    def __init__(self, kv: KVCacheManager, lookup: Callable[[str], Request | None],
                 copy: Callable[[list[tuple[int, int]]], None]) -> None:
        self.kv = kv
        self.lookup = lookup  # request id -> the engine's request (waiting, running or receiving KV), or None
        self.copy = copy  # copies KV blocks on the device (copy_blocks on the engine's cache)
        self.forked = 0  # requests that took a sibling's prompt KV
        self.shared_tokens = 0  # prompt tokens they did not compute

    def _source(self, req: Request) -> Request | None:
        """The sibling `req` may fork from, or None when it computes its prompt itself."""
        rid = req.params.fork_from
        if not rid or req.output_token_ids or rid == req.request_id or req.needs_prompt_logprobs:
            return None  # (prompt logprobs need every prompt position computed by the request itself)
        src = self.lookup(rid)
        if src is None or src.is_finished or src.prompt_token_ids != req.prompt_token_ids:
            return None
        return src

    def held_back(self, req: Request) -> bool:
        """Whether `req` should wait: its source is still computing the prompt (it would be computed twice)."""
        src = self._source(req)
        return src is not None and not self._ready(src)

    def _ready(self, src: Request) -> bool:
        """The source's blocks hold the KV of every prompt position but the last (the one the fork recomputes):
        computed here, or received (a request receiving KV counts nothing computed until it has all arrived)."""
        return (src.status in (RequestStatus.WAITING, RequestStatus.RUNNING) and self.kv.has(src.request_id)
                and src.num_computed_tokens >= src.num_prompt_tokens - 1)

    def take(self, req: Request) -> int:
        """Fork `req` (holding no blocks) from its source if it is ready; returns the tokens now computed (0: no
        fork, nothing changed). The copy of the last block is queued on the device before this returns."""
        src = self._source(req)
        if src is None or not self._ready(src):
            return 0
        num_tokens = req.num_prompt_tokens - 1
        pairs = self.kv.fork(src.request_id, req.request_id, num_tokens)
        if pairs is None:
            return 0  # no free block for the copy: compute it as usual (the waiting rule handles the shortage)
        self.copy(pairs)
        self.forked += 1
        self.shared_tokens += num_tokens
        return num_tokens
