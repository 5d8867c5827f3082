"""Which finished prompts' KV blocks are held for a decode worker, and until when.

Block ownership on the prefill side:
- while the prompt runs, the blocks belong to the engine request;
- when its first token is sampled, the engine finishes the request but keeps its
  blocks (`keep_blocks_on_finish`) and the lease table takes them over;
- they are freed exactly once, by whichever comes first: the decode side's
  transfer notification, a `ReleaseKV` RPC, an `Abort`, or the lease deadline.
A decode worker never starts a read whose lease ends within its transfer
timeout, so a lease cannot expire under an in-flight read.
"""

from __future__ import annotations

import time


class LeaseTable:
    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self._deadlines: dict[str, float] = {}

    def grant(self, request_id: str, now: float | None = None) -> float:
        """Start a lease; returns its deadline as unix time."""
        deadline = (time.time() if now is None else now) + self.lease_s
        self._deadlines[request_id] = deadline
        return deadline

    def release(self, request_id: str) -> bool:
        """End a lease early; False if there was none (already released or expired)."""
        return self._deadlines.pop(request_id, None) is not None

    def expired(self, now: float | None = None) -> list[str]:
        """Remove and return the leases past their deadline."""
        now = time.time() if now is None else now
        gone = [r for r, d in self._deadlines.items() if d <= now]
        for r in gone:
            del self._deadlines[r]
        return gone

    def __len__(self) -> int:
        return len(self._deadlines)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._deadlines
