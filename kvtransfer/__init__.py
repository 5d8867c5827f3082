"""Moving KV-cache blocks between worker processes: one interface, three backends.

- "local": in-process agents on a shared LocalFabric (tests, single-process setups).
- "tcp": a small TCP block server per agent; readers pull raw block bytes.
- "nixl": NIXL one-sided READs over UCX (needs the NIXL package: pip install nixl-cu12).
- "cuda_ipc": same-host GPU peers; the peer's pool is mapped with CUDA IPC and copied device-to-device.

See kvtransfer.base for the ownership rules every backend guarantees.
"""

from kvtransfer.base import (
    BackendUnavailableError,
    KVLayout,
    KVTransferAgent,
    LayoutMismatchError,
    TransferError,
    TransferHandle,
    TransferStatus,
)
from kvtransfer.cuda_ipc import CudaIpcAgent
from kvtransfer.faults import FAULT_MODES
from kvtransfer.local import LocalAgent, LocalFabric
from kvtransfer.nixl import NixlAgent
from kvtransfer.registry import available_backends, create_agent, known_backends, register_backend
from kvtransfer.tcp import TcpAgent

__all__ = [
    "FAULT_MODES",
    "BackendUnavailableError",
    "CudaIpcAgent",
    "KVLayout",
    "KVTransferAgent",
    "LayoutMismatchError",
    "LocalAgent",
    "LocalFabric",
    "NixlAgent",
    "TcpAgent",
    "TransferError",
    "TransferHandle",
    "TransferStatus",
    "available_backends",
    "create_agent",
    "known_backends",
    "register_backend",
]
