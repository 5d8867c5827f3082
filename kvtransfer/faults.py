"""Test-only fault injection shared by every backend (option `fault=` of create_agent).

- None: reads run normally.
- "fail": every read this agent starts ends FAILED without touching any memory.
- "hang": every read this agent starts stays PENDING until released; nothing is in flight, so release()
  returns at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvtransfer.base import TransferHandle, TransferStatus

FAULT_MODES: tuple[str | None, ...] = (None, "fail", "hang")


class FaultInjector:
    def __init__(self, mode: str | None) -> None:
        if mode not in FAULT_MODES:
            raise ValueError(f"fault must be one of {FAULT_MODES}, got {mode!r}")
        self.mode = mode

    def intercept(self, handle: TransferHandle) -> bool:
        """True: the read is faked (the backend must not start it)."""
        if self.mode is None:
            return False
        handle.fault = self.mode
        if self.mode == "fail":
            handle.error = "injected fault: fail"
        return True

    def status(self, handle: TransferHandle) -> TransferStatus:
        from kvtransfer.base import TransferStatus

        return TransferStatus.FAILED if handle.fault == "fail" else TransferStatus.PENDING
