"""TCP backend ("tcp"): every agent serves reads of its blocks on a small TCP server; readers pull bytes.

metadata() is b"host:port" of the agent's server (bind option `host`, default 127.0.0.1; `port` 0 picks a free
one; `advertise_host` overrides the host written into the metadata). One connection per read:

    reader -> server   frame {"op": "read", "tag", "blocks": [remote ids], "layers": [l0, l1] | null,
                              "heads": [h0, h1] | null, "part_bytes", "layout": reader's KVLayout}
    server -> reader   frame {"ok", "error", "layout", "num_blocks"}, then if ok the raw bytes of the blocks (of
                       their layers l0..l1 and the server's heads h0..h1 only, when given), in order

Without "heads" both layouts must match exactly; with them (tensor-parallel shards of different widths) only
what a head range needs (kvtransfer/parts.py), and the server checks that it sends `part_bytes` per block, what
the reader scatters into its own head range.
    reader -> server   frame {"op": "done", "tag"} once every byte is in its blocks -> server's notifications()

A frame is a 4-byte big-endian length and a JSON object. Remote block ids and the layout are checked by the
server (the metadata carries neither), so a bad id or a layout mismatch ends the read FAILED, with the
reason in `handle.error`. Every socket has a timeout; any socket error ends the read FAILED.

Cancel: release() of a PENDING read sets its cancel flag and shuts its socket down, which unblocks a receive
in progress at once; it then waits (deadline `release_timeout_s`) until no receive into the local blocks
runs, and none can start.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import torch

from kvtransfer._memory import BlockMemory
from kvtransfer._threaded import BackgroundRead, ThreadedReads
from kvtransfer.base import (
    DEFAULT_RELEASE_TIMEOUT_S,
    KVLayout,
    KVTransferAgent,
    LayoutMismatchError,
    NotificationInbox,
    TransferError,
    TransferHandle,
    block_id_array,
)
from kvtransfer.parts import BlockRuns, HeadRanges, block_runs, check_mappable, check_shards
from kvtransfer.registry import register_backend

_LEN = struct.Struct("!I")
MAX_FRAME = 1 << 24
ACCEPT_POLL_S = 0.2  # how often the accept loop looks at its stop flag
SOCKET_BUFFER = 4 << 20


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    while len(view):
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("peer closed the connection mid-message")
        view = view[n:]


def send_frame(sock: socket.socket, obj: dict[str, Any]) -> None:
    body = json.dumps(obj).encode()
    sock.sendall(_LEN.pack(len(body)) + body)


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    head = bytearray(_LEN.size)
    recv_exact(sock, memoryview(head))
    (size,) = _LEN.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    body = bytearray(size)
    recv_exact(sock, memoryview(body))
    obj = json.loads(body)
    if not isinstance(obj, dict):
        raise ValueError("frame is not a JSON object")
    return obj


def parse_address(metadata: bytes) -> tuple[str, int]:
    try:
        host, sep, port = metadata.decode().rpartition(":")
        if not sep or not host:
            raise ValueError
        return host.strip("[]"), int(port)
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"tcp metadata must be b'host:port', got {metadata[:64]!r}") from None


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)


class _BlockServer:
    """Serves reads of one agent's blocks; one daemon thread per connection."""

    def __init__(self, agent: TcpAgent, host: str, port: int, io_timeout_s: float,
                 on_done: Callable[[str], None]) -> None:
        self._agent, self._io_timeout_s, self._on_done = agent, io_timeout_s, on_done
        self._listener = socket.create_server((host, port), backlog=128)
        self._listener.settimeout(ACCEPT_POLL_S)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name=f"kv-tcp-accept-{agent.name}", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            threading.Thread(target=self._serve, args=(conn,), name="kv-tcp-serve", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(self._io_timeout_s)
                _tune(conn)
                req = recv_frame(conn)
                blocks, runs, error = self._check(req)
                agent = self._agent
                send_frame(conn, {"ok": error is None, "error": error, "layout": agent.layout.to_dict(),
                                  "num_blocks": agent.num_blocks})
                if error is not None:
                    return
                staging = agent.memory.new_staging()
                for b in blocks:
                    conn.sendall(agent.memory.source(b, staging, runs))
                done = recv_frame(conn)
                if done.get("op") == "done" and done.get("tag") == req["tag"]:
                    self._on_done(req["tag"])
            except (OSError, ValueError):
                return  # the reader went away or cancelled; nothing of ours to clean up

    def _check(self, req: dict[str, Any]) -> tuple[list[int], BlockRuns | None, str | None]:
        agent = self._agent
        blocks, layers, heads = req.get("blocks"), req.get("layers"), req.get("heads")
        if req.get("op") != "read" or not isinstance(req.get("tag"), str) or not isinstance(blocks, list):
            return [], None, "malformed read request"
        try:
            ids = block_id_array(blocks, agent.num_blocks, "remote").tolist()
            reader = KVLayout.from_dict(req.get("layout") or {})
            layers = None if layers is None else (int(layers[0]), int(layers[1]))
            heads = None if heads is None else (int(heads[0]), int(heads[1]))
            if heads is None:
                agent.layout.check_compatible(reader)
            else:  # our head range (checked by block_runs); `part_bytes` says the reader's is as long
                check_shards(agent.layout, reader)
            runs = block_runs(agent.layout, layers, heads)
            if req.get("part_bytes", runs.nbytes) != runs.nbytes:
                raise ValueError(f"the reader expects {req.get('part_bytes')} bytes a block, this part is {runs.nbytes}")
        except (ValueError, TypeError, IndexError) as e:
            return [], None, str(e)
        return ids, runs, None

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=ACCEPT_POLL_S * 10)


class _Conn:
    """A reader's socket that release() may shut down from another thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()  # shutdown and close never interleave: the fd cannot be reused in between
        self._closed = False

    def interrupt(self) -> None:
        with self._lock:
            if not self._closed:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.sock.close()


@register_backend("tcp")
class TcpAgent(ThreadedReads, KVTransferAgent):
    def __init__(self, name: str, kv_cache: torch.Tensor, *, host: str = "127.0.0.1", port: int = 0,
                 advertise_host: str | None = None, connect_timeout_s: float = 2.0, io_timeout_s: float = 10.0,
                 fault: str | None = None, release_timeout_s: float = DEFAULT_RELEASE_TIMEOUT_S) -> None:
        super().__init__(name, kv_cache, fault=fault, release_timeout_s=release_timeout_s)
        self.memory = BlockMemory(kv_cache, self.layout.block_bytes)
        self._connect_timeout_s, self._io_timeout_s = connect_timeout_s, io_timeout_s
        self._remotes: dict[str, tuple[str, int]] = {}
        self._inbox = NotificationInbox()
        self._server = _BlockServer(self, host, port, io_timeout_s, self._inbox.push)
        self.address = (advertise_host or host, self._server.port)

    def metadata(self) -> bytes:
        host, port = self.address
        return f"[{host}]:{port}".encode() if ":" in host else f"{host}:{port}".encode()

    def add_remote(self, name: str, metadata: bytes) -> None:
        self._remotes[name] = parse_address(metadata)

    def notifications(self) -> list[str]:
        return self._inbox.drain()

    def _remote_num_blocks(self, remote: str) -> int | None:
        if remote not in self._remotes:
            raise ValueError(f"unknown remote {remote!r}: call add_remote() first")
        return None

    def _start(self, handle: TransferHandle) -> None:
        read = BackgroundRead(f"kv-tcp-{self.name}-{handle.tag}")
        handle.state = read
        address = self._remotes[handle.remote]
        read.start(lambda r: self._read(r, handle, address))

    def _read(self, read: BackgroundRead, handle: TransferHandle, address: tuple[str, int]) -> None:
        conn = _Conn(socket.create_connection(address, timeout=self._connect_timeout_s))
        try:
            read.on_cancel(conn.interrupt)
            read.check_cancelled()
            sock = conn.sock
            sock.settimeout(self._io_timeout_s)
            _tune(sock)
            runs = block_runs(self.layout, handle.layers, handle.heads[1] if handle.heads else None)
            send_frame(sock, {"op": "read", "tag": handle.tag, "blocks": handle.remote_blocks.tolist(),
                              "layers": list(handle.layers) if handle.layers else None,
                              "heads": list(handle.heads[0]) if handle.heads else None, "part_bytes": runs.nbytes,
                              "layout": self.layout.to_dict()})
            self._check_reply(recv_frame(sock), handle.heads)
            staging = self.memory.new_staging()
            for b in handle.local_blocks.tolist():
                with read.writing():
                    recv_exact(sock, self.memory.sink(b, staging, runs))
                    self.memory.commit(b, staging, runs)
            send_frame(sock, {"op": "done", "tag": handle.tag})
        finally:
            conn.close()

    def _check_reply(self, reply: dict[str, Any], heads: HeadRanges | None = None) -> None:
        if reply.get("ok"):
            return
        try:
            check_mappable(self.layout, KVLayout.from_dict(reply.get("layout") or {}), heads)
        except LayoutMismatchError:
            raise  # the reader's view of the mismatch reads better than the server's
        except ValueError:
            pass
        raise TransferError(f"peer refused the read: {reply.get('error')}")

    def _close(self) -> None:
        self._server.close()
