"""kvtransfer: every backend moves blocks byte-exact and honours the ownership rules.

The reader ("decode") agent lives in this process. Its peer ("prefill"), which owns a random kv_cache, lives
in this process for the local backend and in a spawned child process for tcp and nixl. NIXL is a required
dependency: when it cannot be imported the nixl tests fail, they never skip.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import kvtransfer.nixl
from kvtransfer import (
    BackendUnavailableError,
    KVLayout,
    KVTransferAgent,
    LayoutMismatchError,
    LocalFabric,
    TransferError,
    TransferHandle,
    TransferStatus,
    available_backends,
    create_agent,
)
from kvtransfer.base import block_id_array
from kvtransfer.cuda_ipc import CudaIpcAgent, block_runs, run_starts
from kvtransfer.tcp import recv_frame, send_frame
from tests.kvtransfer_peer import (
    NUM_BLOCKS,
    InProcessPeer,
    ProcessPeer,
    make_agent,
    make_cache,
    wait_done,
    wait_notifications,
)

BACKENDS = ["local", "tcp", "nixl", "nixl-thread"]  # nixl on CPU pools polls; nixl-thread: NIXL's own thread
PEER_SEED = 1234
PEER_SCRATCH = list(range(40, NUM_BLOCKS))  # the peer's blocks it reads into; other tests read only below
DONE, FAILED, PENDING = TransferStatus.DONE, TransferStatus.FAILED, TransferStatus.PENDING


@dataclass
class Pair:
    backend: str
    agent: KVTransferAgent  # the reader, in this process
    peer: InProcessPeer | ProcessPeer  # owns a cache equal to `expected`
    expected: torch.Tensor
    fabric: LocalFabric | None


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.fixture(scope="module", params=BACKENDS)
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    backend = request.param
    fabric = LocalFabric() if backend == "local" else None
    agent = make_agent(backend, "decode", make_cache(None), fabric=fabric)
    try:
        if backend == "local":
            assert fabric is not None
            peer: InProcessPeer | ProcessPeer = InProcessPeer(backend, "prefill", PEER_SEED, fabric)
        else:
            peer = ProcessPeer(backend, "prefill", PEER_SEED)
    except BaseException:
        agent.close()
        raise
    try:
        agent.add_remote("prefill", peer.call("metadata"))
        agent.add_remote("prefill", peer.call("metadata"))  # idempotent
        peer.call("add_remote", "decode", agent.metadata())
        yield Pair(backend, agent, peer, make_cache(PEER_SEED), fabric)
    finally:
        agent.close()
        peer.close()


@pytest.fixture
def fresh(pair: Pair) -> Pair:
    pair.agent.kv_cache.zero_()
    pair.agent.notifications()
    pair.peer.call("notifications", 0, 0.0)
    return pair


def side_agent(p: Pair, name: str, **options: object) -> KVTransferAgent:
    """Another reader in this process, reaching the same peer."""
    agent = make_agent(p.backend, name, make_cache(None), fabric=p.fabric, **options)
    agent.add_remote("prefill", p.peer.call("metadata"))
    return agent


def test_read_is_byte_exact_and_notifies(fresh: Pair) -> None:
    rng = random.Random(7)
    remote, local = rng.sample(range(40), 12), rng.sample(range(NUM_BLOCKS), 12)  # scattered, out of order
    before = fresh.agent.bytes_moved
    handle = fresh.agent.start_read("prefill", remote, local, tag="req-1")
    assert handle.local_blocks.dtype == np.int64 and handle.remote_blocks.tolist() == remote
    assert wait_done(fresh.agent, [handle]) == [DONE]
    fresh.agent.release(handle)
    assert same_bytes(fresh.agent.kv_cache[local], fresh.expected[remote])
    untouched = [b for b in range(NUM_BLOCKS) if b not in local]
    assert not fresh.agent.kv_cache[untouched].any()
    assert fresh.agent.bytes_moved - before == 12 * fresh.agent.layout.block_bytes
    assert fresh.peer.call("notifications", 1, 10.0) == ["req-1"]


def test_layer_range_reads_move_only_those_layers(fresh: Pair) -> None:
    """Layer-wise streaming reads one layer group of each block at a time: exactly those bytes land, the other
    layers stay untouched, and the two groups together equal a whole-block read."""
    remote, local = [3, 17, 5, 30], [9, 2, 40, 11]
    before = fresh.agent.bytes_moved
    h = fresh.agent.start_read("prefill", remote, local, tag="layers-1#g1", layers=(1, 2))
    assert wait_done(fresh.agent, [h]) == [DONE]
    fresh.agent.release(h)
    assert same_bytes(fresh.agent.kv_cache[local, 1], fresh.expected[remote, 1])
    assert not fresh.agent.kv_cache[local, 0].any()
    assert fresh.agent.bytes_moved - before == 4 * fresh.agent.layout.layer_bytes
    h = fresh.agent.start_read("prefill", remote, local, tag="layers-1", layers=(0, 1))
    assert wait_done(fresh.agent, [h]) == [DONE]
    fresh.agent.release(h)
    assert same_bytes(fresh.agent.kv_cache[local], fresh.expected[remote])
    assert sorted(fresh.peer.call("notifications", 2, 10.0)) == ["layers-1", "layers-1#g1"]
    with pytest.raises(ValueError, match="layer range"):
        fresh.agent.start_read("prefill", remote, local, tag="bad", layers=(1, 5))


def test_concurrent_reads(fresh: Pair) -> None:
    rng = random.Random(11)
    locals_ = rng.sample(range(NUM_BLOCKS), 24)
    jobs = [(f"cc-{i}", rng.sample(range(40), 6), locals_[6 * i:6 * i + 6]) for i in range(4)]
    before = fresh.agent.bytes_moved
    handles = [fresh.agent.start_read("prefill", remote, local, tag=tag) for tag, remote, local in jobs]
    assert wait_done(fresh.agent, handles) == [DONE] * 4
    for h in handles:
        fresh.agent.release(h)
    for _, remote, local in jobs:
        assert same_bytes(fresh.agent.kv_cache[local], fresh.expected[remote])
    assert fresh.agent.bytes_moved - before == 24 * fresh.agent.layout.block_bytes
    assert sorted(fresh.peer.call("notifications", 4, 10.0)) == [tag for tag, _, _ in jobs]


def test_peer_reads_our_blocks_and_we_get_the_notification(fresh: Pair) -> None:
    ours = make_cache(99)
    fresh.agent.kv_cache.copy_(ours)
    src = [3, 17, 0, 29]
    status, error, landed = fresh.peer.call("read", "decode", src, PEER_SCRATCH[:4], "back-1")
    assert (status, error) == ("DONE", None)
    assert same_bytes(landed, ours[src])
    assert wait_notifications(fresh.agent, 1, 10.0) == ["back-1"]
    assert fresh.peer.call("bytes_moved") >= 4 * fresh.agent.layout.block_bytes


def test_release_right_after_start_leaves_no_late_write(fresh: Pair) -> None:
    blocks = list(range(40))
    handle = fresh.agent.start_read("prefill", blocks, blocks[::-1], tag="early-release")
    fresh.agent.release(handle)
    snapshot = fresh.agent.kv_cache.clone()
    time.sleep(0.1)
    assert same_bytes(fresh.agent.kv_cache, snapshot)
    assert fresh.agent.poll(handle) in (DONE, FAILED)
    assert fresh.peer.call("notifications", 1, 0.3) in ([], ["early-release"])  # drained for the next test


def test_fault_fail_ends_failed(fresh: Pair) -> None:
    agent = side_agent(fresh, "decode-fail", fault="fail")
    try:
        handle = agent.start_read("prefill", [1, 2], [5, 6], tag="f-1")
        assert agent.poll(handle) is FAILED and "fail" in (handle.error or "")
        agent.release(handle)
        assert not agent.kv_cache.any() and agent.bytes_moved == 0
    finally:
        agent.close()
    assert fresh.peer.call("notifications", 1, 0.3) == []


def test_fault_hang_stays_pending_and_release_meets_its_deadline(fresh: Pair) -> None:
    agent = side_agent(fresh, "decode-hang", fault="hang", release_timeout_s=1.0)
    try:
        handle = agent.start_read("prefill", [1, 2], [5, 6], tag="h-1")
        time.sleep(0.3)
        assert agent.poll(handle) is PENDING
        t0 = time.monotonic()
        agent.release(handle)
        assert time.monotonic() - t0 < 1.0
        assert agent.poll(handle) is FAILED
        assert not agent.kv_cache.any()
        pending = agent.start_read("prefill", [3], [7], tag="h-2")
    finally:
        agent.close()  # releases the read still pending
    assert pending.released


def test_wait_returns_done_once_the_data_arrived(fresh: Pair) -> None:
    rng = random.Random(13)
    remote, local = rng.sample(range(40), 10), rng.sample(range(NUM_BLOCKS), 10)
    handle = fresh.agent.start_read("prefill", remote, local, tag="w-1")
    try:
        assert fresh.agent.wait(handle, 20.0) is DONE, handle.error
        # Checked before release(): DONE alone must mean every byte is in place.
        assert same_bytes(fresh.agent.kv_cache[local], fresh.expected[remote])
    finally:
        fresh.agent.release(handle)
    assert fresh.agent.wait(handle, 5.0) is DONE  # a released, finished read keeps its status
    assert fresh.peer.call("notifications", 1, 10.0) == ["w-1"]


def test_wait_and_poll_count_a_read_once(fresh: Pair) -> None:
    before = fresh.agent.bytes_moved
    handle = fresh.agent.start_read("prefill", list(range(16)), list(range(16, 32)), tag="w-once")
    with ThreadPoolExecutor(4) as pool:  # every waiter and poller races to record the same completion
        waits = [pool.submit(fresh.agent.wait, handle, 20.0) for _ in range(3)]
        polled = wait_done(fresh.agent, [handle])
        statuses = [w.result() for w in waits]
    statuses += [fresh.agent.wait(handle, 1.0), fresh.agent.poll(handle)]
    fresh.agent.release(handle)
    assert polled == [DONE] and statuses == [DONE] * 5
    assert fresh.agent.bytes_moved - before == 16 * fresh.agent.layout.block_bytes
    assert fresh.peer.call("notifications", 1, 10.0) == ["w-once"]


def test_wait_on_a_hung_read_times_out_pending_and_ends_at_release(fresh: Pair) -> None:
    agent = side_agent(fresh, "decode-wait-hang", fault="hang", release_timeout_s=1.0)
    try:
        handle = agent.start_read("prefill", [1, 2], [5, 6], tag="wh-1")
        t0 = time.monotonic()
        assert agent.wait(handle, 0.05) is PENDING
        assert 0.05 <= time.monotonic() - t0 < 1.0
        assert agent.poll(handle) is PENDING and agent.wait(handle, 0.0) is PENDING
        with ThreadPoolExecutor(1) as pool:
            waiter = pool.submit(agent.wait, handle, 30.0)
            time.sleep(0.1)
            t0 = time.monotonic()
            agent.release(handle)  # as an aborted pull does while its wait runs on another thread
            assert waiter.result(timeout=5.0) is FAILED
        assert time.monotonic() - t0 < 1.0
        assert agent.bytes_moved == 0 and not agent.kv_cache.any()
    finally:
        agent.close()


def test_wait_on_a_failing_read_returns_failed_at_once(fresh: Pair) -> None:
    agent = side_agent(fresh, "decode-wait-fail", fault="fail")
    try:
        handle = agent.start_read("prefill", [1, 2], [5, 6], tag="wf-1")
        t0 = time.monotonic()
        assert agent.wait(handle, 30.0) is FAILED and "fail" in (handle.error or "")
        assert time.monotonic() - t0 < 1.0
        assert agent.poll(handle) is FAILED
        agent.release(handle)
        assert agent.bytes_moved == 0
    finally:
        agent.close()
    assert fresh.peer.call("notifications", 1, 0.3) == []


def test_block_ids_are_validated(fresh: Pair) -> None:
    agent = fresh.agent
    with pytest.raises(ValueError, match="local block ids out of range"):
        agent.start_read("prefill", [0], [NUM_BLOCKS], tag="v-1")
    with pytest.raises(ValueError, match="local block ids out of range"):
        agent.start_read("prefill", [0], [-1], tag="v-2")
    with pytest.raises(ValueError, match="equal"):
        agent.start_read("prefill", [0, 1], [0], tag="v-3")
    with pytest.raises(ValueError, match="repeat"):
        agent.start_read("prefill", [0, 1], [4, 4], tag="v-4")
    with pytest.raises(ValueError, match="unknown remote"):
        agent.start_read("nobody", [0], [0], tag="v-5")
    if fresh.backend == "tcp":  # tcp metadata carries no block count: the peer refuses the read
        handle = agent.start_read("prefill", [NUM_BLOCKS + 5], [0], tag="v-6")
        assert wait_done(agent, [handle]) == [FAILED]
        assert "out of range" in (handle.error or "")
        agent.release(handle)
    else:
        with pytest.raises(ValueError, match="remote block ids out of range"):
            agent.start_read("prefill", [NUM_BLOCKS + 5], [0], tag="v-6")
    assert not agent.kv_cache.any()


def test_block_id_array_copies_and_checks() -> None:
    ids = np.array([3, 1, 2], dtype=np.int32)
    arr = block_id_array(ids, 4, "local", unique=True)
    assert arr.dtype == np.int64 and arr.tolist() == [3, 1, 2] and not arr.flags.writeable
    ids[0] = 0
    assert arr[0] == 3  # a copy: the caller may reuse its array while the read runs
    assert block_id_array(range(2), None, "remote").tolist() == [0, 1]
    assert block_id_array([], 4, "local").dtype == np.int64  # start_read() refuses it, saying "non-empty"
    assert block_id_array([1, 1], 4, "remote").tolist() == [1, 1]  # only local ids must be distinct
    for bad in ([True, False], [1.0, 2.0], ["1"], [[1], [2]], [1, None]):
        with pytest.raises(ValueError, match="flat sequence of integers"):
            block_id_array(bad, 4, "local")
    with pytest.raises(ValueError, match=r"remote block ids out of range \[0, 4\): \[4, -1\]"):
        block_id_array([0, 4, -1], 4, "remote")
    with pytest.raises(ValueError, match=r"out of range \[0, 9223372036854775808\): \[9223372036854775808\]"):
        block_id_array(np.array([2**63], dtype=np.uint64), None, "remote")  # not wrapped to a negative int64
    with pytest.raises(ValueError, match="local block ids repeat"):
        block_id_array([5, 0, 5], 8, "local", unique=True)


def test_layout_mismatch_names_each_field() -> None:
    a = KVLayout.from_cache(make_cache(None))
    b = KVLayout.from_cache(make_cache(None, block_size=16, dtype=torch.bfloat16))
    with pytest.raises(LayoutMismatchError) as info:
        a.check_compatible(b)
    msg = str(info.value)
    for text in ("block_size: 8", "16", "dtype: 'float16'", "'bfloat16'", "block_bytes"):
        assert text in msg
    assert "num_layers" not in msg and "head_dim" not in msg
    a.check_compatible(KVLayout.from_dict(a.to_dict()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_mismatch_between_agents(backend: str) -> None:
    fabric = LocalFabric()
    owner = make_agent(backend, f"lm-owner-{backend}", make_cache(1), fabric=fabric)
    reader = make_agent(backend, f"lm-reader-{backend}", make_cache(None, block_size=16), fabric=fabric)
    try:
        if backend == "tcp":  # only the peer knows its layout: the read fails, saying why
            reader.add_remote("owner", owner.metadata())
            handle = reader.start_read("owner", [0], [0], tag="lm")
            assert wait_done(reader, [handle]) == [FAILED]
            assert "block_size: 16 here vs 8 there" in (handle.error or "")
            reader.release(handle)
        else:
            with pytest.raises(LayoutMismatchError, match="block_size: 16 here vs 8 there"):
                reader.add_remote("owner", owner.metadata())
        assert not reader.kv_cache.any()
    finally:
        reader.close()
        owner.close()


def test_unreachable_tcp_peer_fails_without_raising() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    agent = create_agent("tcp", "lonely", make_cache(None), connect_timeout_s=1.0)
    try:
        agent.add_remote("ghost", f"127.0.0.1:{port}".encode())
        handle = agent.start_read("ghost", [0, 1], [2, 3], tag="u-1")
        assert wait_done(agent, [handle], timeout=5.0) == [FAILED]
        assert handle.error
        agent.release(handle)
        with pytest.raises(ValueError, match="host:port"):
            agent.add_remote("bad", b"no-port-here")
    finally:
        agent.close()


def _stalling_server(listener: socket.socket, layout: KVLayout, go_on: threading.Event) -> None:
    """Answers one read with half a block, stalls until `go_on` (or 5 s), then tries to send the rest."""
    listener.settimeout(5.0)
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(5.0)
        recv_frame(conn)
        send_frame(conn, {"ok": True, "error": None, "layout": layout.to_dict(), "num_blocks": 4})
        conn.sendall(b"\x11" * (layout.block_bytes // 2))
        go_on.wait(5.0)
        with contextlib.suppress(OSError):
            conn.sendall(b"\x22" * (layout.block_bytes * 2))


@contextlib.contextmanager
def stalled_tcp_reader(name: str) -> Iterator[tuple[KVTransferAgent, threading.Event, threading.Thread]]:
    """A tcp agent whose remote "staller" sends half a block, then waits for the event before the rest."""
    agent = create_agent("tcp", name, make_cache(None), release_timeout_s=2.0)
    listener = socket.create_server(("127.0.0.1", 0))
    go_on = threading.Event()
    server = threading.Thread(target=_stalling_server, args=(listener, agent.layout, go_on), daemon=True)
    server.start()
    try:
        agent.add_remote("staller", f"127.0.0.1:{listener.getsockname()[1]}".encode())
        yield agent, go_on, server
    finally:
        go_on.set()
        listener.close()
        agent.close()


def test_tcp_release_stops_an_inflight_write() -> None:
    with stalled_tcp_reader("cancel-reader") as (agent, go_on, server):
        handle = agent.start_read("staller", [0, 1], [2, 3], tag="c-1")
        flat = agent.kv_cache[2].view(-1).view(torch.uint8)
        deadline = time.monotonic() + 5.0
        while not flat[0] and time.monotonic() < deadline:  # the first half-block has landed
            time.sleep(0.005)
        assert agent.poll(handle) is PENDING
        t0 = time.monotonic()
        agent.release(handle)
        assert time.monotonic() - t0 < 1.0
        snapshot = agent.kv_cache.clone()
        go_on.set()
        server.join(5.0)
        time.sleep(0.1)
        assert same_bytes(agent.kv_cache, snapshot)  # nothing landed after release()
        assert not agent.kv_cache[3].any() and agent.poll(handle) is FAILED


def test_tcp_wait_times_out_on_a_stalled_read_and_ends_at_release() -> None:
    """The backend's own wait (not a faked read): a read stuck mid-block times out PENDING, like poll."""
    with stalled_tcp_reader("wait-reader") as (agent, _, _):
        handle = agent.start_read("staller", [0, 1], [2, 3], tag="ws-1")
        t0 = time.monotonic()
        assert agent.wait(handle, 0.1) is PENDING
        assert time.monotonic() - t0 >= 0.1 and agent.poll(handle) is PENDING
        with ThreadPoolExecutor(1) as pool:
            waiter = pool.submit(agent.wait, handle, 30.0)
            time.sleep(0.1)
            agent.release(handle)
            assert waiter.result(timeout=5.0) is FAILED
        assert agent.bytes_moved == 0


@contextlib.contextmanager
def cuda_pair(backend: str, name: str) -> Iterator[tuple[KVTransferAgent, InProcessPeer | ProcessPeer]]:
    """A reader with a CUDA cache and a peer ("<name>-prefill-<backend>") whose cache is make_cache(PEER_SEED)."""
    if backend.startswith("nixl") and not kvtransfer.nixl.NixlAgent.is_available():
        pytest.skip("NIXL is not installed (a GPU machine may lack it; CI installs it)")
    fabric = LocalFabric() if backend == "local" else None
    reader = make_agent(backend, f"{name}-decode-{backend}", make_cache(None, device="cuda"), fabric=fabric)
    peer = (InProcessPeer(backend, f"{name}-prefill-{backend}", PEER_SEED, fabric, device="cuda") if fabric
            else ProcessPeer(backend, f"{name}-prefill-{backend}", PEER_SEED, device="cuda"))
    try:
        torch.cuda.synchronize()  # the caches are written: no read is ordered after this thread's stream
        yield reader, peer
    finally:
        reader.close()
        peer.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_caches_move_byte_exact(backend: str) -> None:
    with cuda_pair(backend, "cuda") as (reader, peer):
        reader.add_remote("prefill", peer.call("metadata"))
        peer.call("add_remote", "decode", reader.metadata())
        remote, local = [5, 0, 33, 12, 7], [40, 2, 19, 3, 30]
        handle = reader.start_read("prefill", remote, local, tag="cuda-1")
        assert wait_done(reader, [handle]) == [DONE], handle.error
        reader.release(handle)
        assert same_bytes(reader.kv_cache[local].cpu(), make_cache(PEER_SEED)[remote])
        assert peer.call("notifications", 1, 10.0) == ["cuda-1"]
        reader.kv_cache.copy_(make_cache(99, device="cuda"))
        torch.cuda.synchronize()  # the peer's read is not ordered after this thread's stream
        status, error, landed = peer.call("read", "decode", [1, 2, 3], [44, 45, 46], "cuda-back")
        assert (status, error) == ("DONE", None)
        assert same_bytes(landed, make_cache(99)[[1, 2, 3]])
        assert wait_notifications(reader, 1, 10.0) == ["cuda-back"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [*BACKENDS, "cuda_ipc"])
def test_cuda_wait_returns_done_once_the_data_arrived(backend: str) -> None:
    with cuda_pair(backend, "cuda-wait") as (reader, peer):
        reader.add_remote("prefill", peer.call("metadata"))
        expected, before = make_cache(PEER_SEED), reader.bytes_moved
        # cuda_ipc: scattered ids take the gather-scatter kernel (ids copied to the device), runs the memcpys.
        for tag, remote, local in [("cw-scattered", [5, 0, 33, 12, 7, 20], [40, 2, 19, 3, 30, 1]),
                                   ("cw-runs", [10, 11, 12, 13], [20, 21, 22, 23])]:
            handle = reader.start_read("prefill", remote, local, tag=tag)
            try:
                assert reader.wait(handle, 20.0) is DONE, handle.error
                assert same_bytes(reader.kv_cache[local].cpu(), expected[remote])
                assert reader.poll(handle) is DONE and reader.wait(handle, 1.0) is DONE
            finally:
                reader.release(handle)
        assert reader.bytes_moved - before == 10 * reader.layout.block_bytes


@contextlib.contextmanager
def cuda_ipc_reader(name: str) -> Iterator[CudaIpcAgent]:
    """A cuda_ipc reader of a peer (in a child process, as CUDA IPC needs) whose cache is make_cache(PEER_SEED)."""
    reader = make_agent("cuda_ipc", name, make_cache(None, device="cuda"))
    assert isinstance(reader, CudaIpcAgent)
    torch.cuda.synchronize()  # its cache is zeroed before a copy, which does not wait for this thread's stream
    try:
        peer = ProcessPeer("cuda_ipc", f"{name}-owner", PEER_SEED, device="cuda")
    except BaseException:
        reader.close()
        raise
    try:
        reader.add_remote("prefill", peer.call("metadata"))
        yield reader
    finally:
        reader.close()
        peer.close()


# The conftest runs Triton kernels in the interpreter (for the CPU kernel tests); there a gather-scatter copies
# synchronously through the host, so no copy stays queued. On a GPU: TRITON_INTERPRET=0 pytest -k cuda.
QUEUED_GPU_COPY = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") != "0",
                                     reason="needs a CUDA device and compiled Triton kernels (TRITON_INTERPRET=0)")


def queue_gpu_work(reader: CudaIpcAgent) -> None:
    """About 0.2 s of work on the reader's copy stream: a read started now waits for it on the GPU. (Work on this
    thread's current stream would not delay it: start_read() does not order the copy after that stream.)"""
    with torch.cuda.stream(reader._stream):
        torch.cuda._sleep(400_000_000)


QUEUED_READ = ([3, 9, 1, 27, 4, 15], [0, 8, 16, 24, 32, 40])  # scattered: the gather-scatter kernel


def start_queued_read(reader: CudaIpcAgent, tag: str) -> TransferHandle:
    """A read of QUEUED_READ started behind queue_gpu_work(): it stays PENDING for ~0.2 s."""
    queue_gpu_work(reader)
    return reader.start_read("prefill", *QUEUED_READ, tag=tag)


@QUEUED_GPU_COPY
def test_cuda_ipc_wait_on_a_queued_copy() -> None:
    remote, local = QUEUED_READ
    with cuda_ipc_reader("ipc-wait-queued") as reader:
        handle = start_queued_read(reader, "q-1")
        t0 = time.monotonic()
        assert reader.wait(handle, 0.0) is PENDING and reader.poll(handle) is PENDING
        assert time.monotonic() - t0 < 0.05  # a spent timeout never blocks on the event
        assert reader.wait(handle, 20.0) is DONE, handle.error
        assert same_bytes(reader.kv_cache[local].cpu(), make_cache(PEER_SEED)[remote])
        reader.release(handle)


@QUEUED_GPU_COPY
def test_cuda_ipc_release_waits_for_the_copy_within_its_deadline() -> None:
    remote, local = QUEUED_READ
    with cuda_ipc_reader("ipc-release-queued") as reader:
        handle = start_queued_read(reader, "r-1")
        reader.release(handle)  # returns only once the copy has landed
        assert same_bytes(reader.kv_cache[local].cpu(), make_cache(PEER_SEED)[remote])
        reader.kv_cache.zero_()
        torch.cuda.synchronize()  # zeroed before the next copy lands, which does not wait for this stream
        reader.release_timeout_s = 0.0  # no time to wait: release() must refuse, the blocks stay owned
        handle = start_queued_read(reader, "r-2")
        with pytest.raises(TransferError, match="still running"):
            reader.release(handle)
        assert not handle.released
        assert reader.wait(handle, 20.0) is DONE
        reader.release(handle)
        assert handle.released and reader.bytes_moved == 6 * reader.layout.block_bytes


def test_registry_errors() -> None:
    assert {"local", "tcp", "nixl"} <= set(available_backends())
    with pytest.raises(ValueError, match="known backends: cuda_ipc, local, nixl, tcp"):
        create_agent("rdma", "x", make_cache(None))
    with pytest.raises(TypeError):
        create_agent("tcp", "x", make_cache(None), no_such_option=1)
    with pytest.raises(ValueError, match="fault"):
        create_agent("local", "x", make_cache(None), fabric=LocalFabric(), fault="explode")
    with pytest.raises(TypeError, match="fabric"):
        create_agent("local", "x", make_cache(None))
    with pytest.raises(ValueError, match="shape"):
        KVLayout.from_cache(torch.zeros(4, 4))


def test_nixl_is_importable() -> None:
    # A required dependency: this fails, never skips, where NIXL is missing.
    assert kvtransfer.nixl.load_nixl_api() is not None


def test_missing_nixl_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvtransfer.nixl, "_API_MODULES", ("no_such_nixl_module._api",))
    assert "nixl" not in available_backends()
    with pytest.raises(BackendUnavailableError, match="pip install nixl-cu12"):
        create_agent("nixl", "x", make_cache(None))


def test_cuda_ipc_block_runs() -> None:
    """The CUDA IPC reader copies maximal runs where both sides' ids are consecutive (one memcpy each)."""
    src, dst = np.array([0, 1, 2, 7, 8, 9, 3]), np.array([3, 4, 9, 10, 11, 12, 0])
    assert block_runs(src, dst) == [(0, 3, 2), (2, 9, 1), (7, 10, 3), (3, 0, 1)]
    assert block_runs(np.arange(5), np.arange(5) + 9) == [(0, 9, 5)]
    assert len(run_starts(np.arange(6), np.arange(6)[::-1])) == 6
    assert block_runs(np.zeros(0, np.int64), np.zeros(0, np.int64)) == []


def test_cuda_ipc_id_pairs_keep_the_dst_row_aligned() -> None:
    from kvtransfer.cuda_ipc import id_pairs

    for n in (1, 2, 5, 6):
        ids = id_pairs(np.arange(n), np.arange(n) + 100)
        assert ids.shape == (2, n + n % 2) and ids.dtype == np.int64
        assert ids[0, :n].tolist() == list(range(n)) and ids[1, :n].tolist() == list(range(100, 100 + n))
        assert ids[1].ctypes.data % 16 == ids[0].ctypes.data % 16  # the dst row starts 16-byte aligned like src


def test_an_idle_nixl_poller_wakes_for_an_expected_read_and_slows_down_after_it() -> None:
    """With `idle_progress_s` the owner's Python poller runs at full rate only while `expect_read` says a peer may
    be reading: the read still completes with nobody else driving the owner's progress, and once its notification
    is in, the poller is back to the idle period."""
    owner = make_agent("nixl", "idle-owner", make_cache(PEER_SEED), idle_progress_s=30.0)
    reader = make_agent("nixl", "idle-reader", make_cache(None))
    try:
        reader.add_remote("idle-owner", owner.metadata())
        assert isinstance(owner, kvtransfer.nixl.NixlAgent)
        assert owner._period() == 30.0
        owner.expect_read("gone", time.monotonic() - 1)  # a lease already past its deadline counts for nothing
        owner.expect_read("req-idle", time.monotonic() + 60)
        assert owner._period() == kvtransfer.nixl.PROGRESS_INTERVAL_S and "gone" not in owner._expected
        h = reader.start_read("idle-owner", [1, 7, 3], [5, 6, 9], tag="req-idle")
        assert reader.wait(h, 20.0) == DONE
        reader.release(h)
        assert same_bytes(reader.kv_cache[[5, 6, 9]], make_cache(PEER_SEED)[[1, 7, 3]])
        deadline = time.monotonic() + 20
        while "req-idle" in owner._expected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert owner._period() == 30.0  # the poller saw the read's notification
        assert owner.notifications() == ["req-idle"]
        owner.expect_read("released", time.monotonic() + 60)  # a lease released (ReleaseKV, Abort) before any read
        assert owner._period() == kvtransfer.nixl.PROGRESS_INTERVAL_S
        owner.expect_read("released", 0.0)
        assert owner._period() == 30.0
    finally:
        reader.close()
        owner.close()
