"""The proposer interface."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from engine.kv_cache_manager import KVCacheManager
from engine.scheduler import SchedulerOutput


class Proposer(ABC):
    """Guesses the next tokens of decoding requests; the target model verifies them in its next pass."""

    name: str = ""

    @abstractmethod
    def propose(self, out: SchedulerOutput, kv: KVCacheManager) -> dict[str, torch.Tensor]:
        """Set `s.request.spec_token_ids` to at most `s.num_spec_tokens` draft tokens for every scheduled request
        with draft slots. Runs after scheduling (blocks for the slots are allocated) and before the target's pass.

        Returns, for sampled requests whose drafts were *sampled* from the proposer's distribution, that
        distribution q (float32 [num_drafts, vocab]) by request id. Requests left out (greedy ones, drafts that
        were looked up) are verified as if q were a point mass on each draft.
        """

    def remove(self, request_id: str) -> None:  # noqa: B027 - optional hook
        """The request finished or was aborted: drop whatever the proposer keeps for it."""
