"""The process of one tensor-parallel rank other than 0: it holds its shard of the model and KV cache and runs
whatever rank 0's messages say, in order, nothing else (no scheduler, no sampler).

    started by rank 0 (engine/parallel/ranks.py) -> "hello" -> join the group -> load this rank's weights
    -> "ready" -> loop: step (forward; logits are gathered, then dropped) | capture | copy blocks | call | stop

It ends when rank 0 says stop, when its pipe from rank 0 closes (rank 0 died), when rank 0's process is gone
(a watchdog: this rank may be blocked in a collective that will never complete), or on any error, which it
reports on the pipe and exits non-zero (rank 0's monitor then fails the engine).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from engine.config import EngineConfig
from engine.model_shard import ModelShard
from engine.parallel import step as msg
from engine.parallel.group import TPGroup, connect
from engine.parallel.kv_heads import RankKV, kv_layout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank's process needs to start (pickled once, at spawn)."""

    rank: int
    size: int
    port: int  # rank 0's TCP store on 127.0.0.1
    backend: str  # gloo | nccl
    device: str  # this rank's device
    config: EngineConfig  # the engine's config: the same weights, dtype, cache and graphs as rank 0
    num_blocks: int
    max_model_len: int
    threads: int  # torch CPU threads (the cores are shared by all ranks)


def main() -> None:
    """`python -m engine.parallel.rank FD`: FD is this rank's socket to rank 0; the RankSpec arrives first."""
    conn = Connection(int(sys.argv[1]))
    rank_main(pickle.loads(conn.recv_bytes()), conn)


def rank_main(spec: RankSpec, conn: Connection) -> None:
    """Rank spec.rank's life, from joining the group to exit."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank-{spec.rank} %(levelname)s %(message)s")
    _exit_with_parent()
    device = torch.device(spec.device)
    if device.type == "cpu":
        torch.set_num_threads(spec.threads)
    code = 0
    try:
        _reply(conn, "hello", os.getpid())
        group = connect(spec.rank, spec.size, spec.port, spec.backend, spec.config.parallel.collective_timeout_s,
                        device)
        shard = ModelShard(spec.config, device, spec.num_blocks, spec.max_model_len, group)
        _trim_heap()
        _reply(conn, "ready", {"pid": os.getpid(), "param_bytes": shard.param_bytes, **resident_memory()})
        layout = kv_layout(spec.config, shard.model_config, spec.num_blocks)
        _serve(conn, shard, group, RankKV(spec.rank, layout, shard.kv_cache))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        log.warning("rank 0 is gone: exiting")
        code = 1
    except BaseException:  # noqa: BLE001 - reported to rank 0, then this process ends
        detail = traceback.format_exc()
        log.error("rank %d failed:\n%s", spec.rank, detail)
        with contextlib.suppress(OSError):
            _reply(conn, "error", detail)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: a process group's destructor may wait on peers that are gone


@torch.inference_mode()
def _serve(conn: Connection, shard: ModelShard, group: TPGroup, ctx: RankKV) -> None:
    block_size = shard.kv_cache.shape[3]
    while True:
        buf = conn.recv_bytes()
        kind = msg.message_kind(buf)
        if kind == msg.STEP:
            step = msg.decode_step(buf, block_size)
            ids = None
            if step.n_device_ids:
                ids = group.broadcast(torch.empty(step.n_device_ids, dtype=torch.long, device=shard.device))
            shard.logits(step.seqs, step.tables, ids, step.q, step.num_layers)
        elif kind == msg.CAPTURE:
            shard.capture(msg.decode_control(buf))
        elif kind == msg.COPY:
            shard.copy_blocks(msg.decode_control(buf))
        elif kind == msg.CALL:
            fn, args = msg.decode_control(buf)
            try:
                tag, value = "ok", fn(ctx, *args)
            except Exception:  # noqa: BLE001 - the caller's function failed, not this rank
                tag, value = "error", traceback.format_exc()
            _reply(conn, tag, value)
        elif kind == msg.STOP:
            return
        else:
            raise RuntimeError(f"unknown message kind {kind}")


def _reply(conn: Connection, tag: str, value: object) -> None:
    """Plain pickle: tensors travel by value (multiprocessing's pickler would pass their storage as file
    descriptors, which needs a multiprocessing parent)."""
    conn.send_bytes(pickle.dumps((tag, value)))


def resident_memory(_ctx: object = None) -> dict[str, int]:
    """This process's resident memory in bytes (VmRSS, RssAnon: anonymous pages such as weights and KV, RssFile:
    mapped files); callable on every rank through LLMEngine.run_on_ranks."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _exit_with_parent() -> None:
    """End this process when rank 0's is gone, even while a collective blocks the main thread."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()


def _trim_heap() -> None:
    """Hand the loader's freed buffers back to the OS, so resident memory is the shard, not the loading peak."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


if __name__ == "__main__":
    main()
