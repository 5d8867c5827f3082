"""A read that runs on its own daemon thread, with cooperative cancellation (local and tcp backends)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from kvtransfer.base import TransferError, TransferHandle, TransferStatus


class ReadCancelled(Exception):
    """Raised inside a read's thread once release() asked it to stop."""


class BackgroundRead:
    """Runs `body(self)` on a daemon thread. The body does every write into local blocks inside
    `with read.writing():`, which refuses to start once cancelled; `on_cancel` sets a hook that unblocks a
    write stuck in I/O (the tcp backend shuts its socket down).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.cancel = threading.Event()
        self.finished = threading.Event()
        self.status = TransferStatus.PENDING
        self.error: str | None = None
        self._interrupt: Callable[[], None] | None = None
        self._write_lock = threading.Lock()  # held for the whole of every write into local blocks
        self._thread: threading.Thread | None = None

    def start(self, body: Callable[[BackgroundRead], None]) -> None:
        self._thread = threading.Thread(target=self._run, args=(body,), name=self.name, daemon=True)
        self._thread.start()

    def _run(self, body: Callable[[BackgroundRead], None]) -> None:
        try:
            body(self)
            self.status = TransferStatus.DONE
        except ReadCancelled:
            self.status, self.error = TransferStatus.FAILED, "cancelled"
        except Exception as e:  # noqa: BLE001 - every failure of a read is reported through its status
            self.status, self.error = TransferStatus.FAILED, str(e) or repr(e)
        finally:
            # Set last: whoever sees `finished` also sees the final status and every byte the body wrote.
            self.finished.set()

    def check_cancelled(self) -> None:
        if self.cancel.is_set():
            raise ReadCancelled

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._write_lock:
            # Checked under the lock: once cancel_and_wait() holds it with `cancel` set, no write can begin.
            self.check_cancelled()
            yield

    def on_cancel(self, interrupt: Callable[[], None] | None) -> None:
        self._interrupt = interrupt

    def poll(self) -> TransferStatus:
        return self.status if self.finished.is_set() else TransferStatus.PENDING

    def cancel_and_wait(self, deadline: float) -> None:
        """Stop the body's writes: on return none is running and none can start; TransferError if a write
        still runs at `deadline`. The thread itself may linger (in connect, say) but will write nothing."""
        if self.finished.is_set():
            return
        self.cancel.set()
        interrupt = self._interrupt
        if interrupt is not None:
            interrupt()
        if not self._write_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TransferError(f"read {self.name} did not stop writing before its release deadline; "
                                "its local blocks may still be written and must not be reused")
        self._write_lock.release()


class ThreadedReads:
    """poll/release of KVTransferAgent for backends whose handles carry a BackgroundRead in `state`."""

    def _poll(self, handle: TransferHandle) -> TransferStatus:
        read: BackgroundRead = handle.state
        status = read.poll()
        handle.error = read.error
        return status

    def _release(self, handle: TransferHandle, deadline: float) -> None:
        read: BackgroundRead | None = handle.state
        if read is not None:
            read.cancel_and_wait(deadline)
