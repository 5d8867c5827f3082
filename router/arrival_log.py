"""The router's record of token batches as they arrive from decode workers, for benchmarks that follow a token
from the engine step that made it to the client.

With $DISAGG_STEP_LOG naming a folder (as for the workers, worker/step_log.py), each router process appends one
JSON line per TokenBatch its reader task takes off a decode worker's Subscribe stream to
`<folder>/router-<pid>.jsonl`: when (`t`, Unix seconds, so it lines up with the workers' logs of the machine),
the subscription (`rid`: the router's subscriber name, which the decode worker's `batch_sent` events carry too),
the worker's address and the requests whose chunks it carried, in order; and as each request ends, one line with
the times its token outputs were handed on to its response (`tokens_relayed`). A Subscribe stream delivers its
messages in order and whole, so the n-th batch a decode worker sent to a subscriber is the n-th that subscriber
received from it: benchmarks/step_costs.py `delivery` pairs them to tell the wire and the router's reader apart
from the worker's steps and from the router's own relay to the client. Without the variable nothing is written.
"""

from __future__ import annotations

import json
import os
import time
from typing import IO

from proto import disagg_pb2

STEP_LOG_ENV = "DISAGG_STEP_LOG"  # the variable worker/step_log.py reads (not imported: it pulls in the engine)
ARRIVAL_EVENT = "batch_received"
RELAY_EVENT = "tokens_relayed"


class ArrivalLog:
    """Writes a line per token batch received (called on the router's event loop only)."""

    def __init__(self, path: str) -> None:
        self._file: IO[str] = open(path, "a", buffering=1 << 16)  # noqa: SIM115 - closed by close()

    @classmethod
    def from_env(cls) -> ArrivalLog | None:
        folder = os.environ.get(STEP_LOG_ENV, "")
        if not folder:
            return None
        path = os.path.join(folder, f"router-{os.getpid()}.jsonl")
        try:
            os.makedirs(folder, exist_ok=True)
            return cls(path)
        except OSError as e:  # at start, before the router serves
            raise SystemExit(f"${STEP_LOG_ENV}={folder!r}: cannot write the router's arrival log {path!r}: "
                             f"{e.strerror}") from e

    def batch(self, subscriber: str, worker: str, batch: disagg_pb2.TokenBatch) -> None:
        if self._file.closed or not batch.chunks:  # the empty batch that opens a subscription was never noted
            return
        self._file.write(json.dumps({"t": round(time.time(), 6), "event": ARRIVAL_EVENT, "rid": subscriber,
                                     "worker": worker, "requests": [c.request_id for c in batch.chunks]}) + "\n")

    def relayed(self, request_id: str, times: list[float]) -> None:
        """One line per request at its end: when each of its token outputs left the router's generation stream for
        the response (Unix seconds), the stage between the reader's `batch_received` and the client."""
        if not self._file.closed and times:
            self._file.write(json.dumps({"t": round(times[-1], 6), "event": RELAY_EVENT, "rid": request_id,
                                         "times": [round(t, 6) for t in times]}) + "\n")

    def close(self) -> None:
        self._file.close()
