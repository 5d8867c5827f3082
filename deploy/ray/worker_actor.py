"""A prefill or decode worker as a Ray actor.

The actor spawns `python -m worker` (the very process `disagg serve` runs) instead of running `serve()` inside
itself, because:
  * the worker's graceful stop hangs off SIGTERM, and signal handlers need the main thread of their process, which
    in an actor belongs to Ray;
  * an engine crash or OOM kill ends the child, and the actor reports it (`info`) instead of dying mid-call;
  * GPUs Ray assigns to the actor (CUDA_VISIBLE_DEVICES) and its OMP_NUM_THREADS pass to the child unchanged.
The child is tied to the actor with PR_SET_PDEATHSIG: when the actor dies (ray.kill, node loss), so does the worker.
A worker of N > 1 tensor-parallel ranks runs in bundle 0 of its replica's placement group and holds the other
bundles while it lives (deploy/ray/rank_bundles.py); its child sees every rank's GPUs.
"""

from __future__ import annotations

import collections
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import ray
import yaml

from deploy.config import ClusterConfig
from deploy.ray.rank_bundles import reserve_ranks

PR_SET_PDEATHSIG = 1
KILL_AFTER_S = 15.0  # after the drain was cut short, how long a worker gets to exit before SIGKILL
_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. The signal fires when the forking *thread* exits, so the actor only
    # spawns from __init__, which Ray runs on the actor's main thread (alive as long as the actor).
    prctl = getattr(_LIBC, "prctl", None)
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def worker_yaml(cluster: dict[str, Any], host: str) -> dict[str, Any]:
    """The cluster dict as this node's worker reads it: the TCP block server listens on the node's address."""
    out = dict(cluster)
    out["transfer"] = {**(cluster.get("transfer") or {}), "host": host}
    return out


def reconstructed() -> bool:
    """Inside an actor: whether it is a restart of one that died (Ray reran `__init__` with the same arguments)."""
    try:
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - the state API is unreachable: behave as a first start
        return False


def call_self_after_init(method: str, retry_s: float = 0.5, wait_s: float = 120.0) -> None:
    """Inside an actor's `__init__`: run its own `method` (no arguments) once the actor serves calls, from a thread
    that retries until one call gets through. A plain `current_actor.<method>.remote()` from the `__init__` of a
    restarting actor is sometimes failed by Ray with ActorUnavailableError (the actor is still RESTARTING), and
    since nothing awaits it the method silently never runs: 3 of 15 restarts of a toy actor, and in the Ray chaos
    soak a router replica that never served again. The error does not say whether the call ran, and a call may
    also stay pending: `method` must be idempotent (a repeated call waits for the first), and a call with no
    answer within `wait_s` is made again."""
    handle = ray.get_runtime_context().current_actor

    def run() -> None:
        while True:
            try:
                ray.get(getattr(handle, method).remote(), timeout=wait_s)
                return
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                time.sleep(retry_s)
            except ray.exceptions.RayError as e:  # the method raised, or the actor is dying: nothing to retry
                print(f"{method} after restart failed: {e}", file=sys.stderr, flush=True)
                return

    threading.Thread(target=run, daemon=True, name=f"after-init-{method}").start()


def discover(namespace: str, timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """`info()` of every worker actor of the deployment (named prefill-N / decode-N in `namespace`), each with its
    "handle": how a router or planner that restarted rebuilds its view from the workers themselves. Actors that
    do not answer within `timeout_s` (dying, or still being placed) are left out."""
    names = [n for n in ray.util.list_named_actors() if n.split("-")[0] in ("prefill", "decode")]
    handles = {n: ray.get_actor(n, namespace=namespace) for n in names}
    refs = {n: h.info.remote() for n, h in handles.items()}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    found = []
    for name, ref in refs.items():
        if ref in ready:
            try:
                found.append({**ray.get(ref), "handle": handles[name]})
            except ray.exceptions.RayError:
                continue  # died meanwhile
    return found


@ray.remote(max_concurrency=4)
class WorkerActor:
    """One worker process on this actor's node; `wait_ready` returns its gRPC address."""

    def __init__(self, name: str, role: str, cluster: dict[str, Any]) -> None:
        self.name, self.role = name, role
        self.host = ray.util.get_node_ip_address()
        self.address = ""
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        env.setdefault("HF_HUB_OFFLINE", "1")
        cfg = ClusterConfig.from_dict(cluster)
        tp, res = cfg.tensor_parallel_size(role), cfg.pool(role).resources
        self._slots: list[Any] = []  # the other ranks' bundles (deploy/ray/rank_bundles.py)
        if tp > 1:
            self._slots, gpus = reserve_ranks(res, tp)
            if res.num_gpus:  # the worker starts its ranks on GPUs 0..N-1 as it sees them: every rank's, in order
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        self._dir = tempfile.mkdtemp(prefix=f"disagg-{name}-")
        path = os.path.join(self._dir, "cluster.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(worker_yaml(cluster, self.host), f)
        cmd = [sys.executable, "-m", "worker", "--role", role, "--worker-id", name, "--host", self.host,
               "--config", path]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                      preexec_fn=_die_with_parent)
        self._lines: collections.deque[str] = collections.deque(maxlen=200)
        self._stopping = False  # stop() was called: the worker drains and exits
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True, name=f"log-{name}").start()

    def wait_ready(self, timeout_s: float) -> str:
        """The worker's gRPC address once it prints READY; raises if it exits first or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.2):
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self._proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f}s:\n{self.log_tail()}")
        return self.address

    def info(self) -> dict[str, Any]:
        """Liveness of the worker process (the actor answering says nothing about it), and whether it was told to
        stop (a planner that restarts finds draining replicas by this)."""
        code = self._proc.poll()
        return {"name": self.name, "role": self.role, "address": self.address, "node": self.host,
                "pid": self._proc.pid, "alive": code is None, "returncode": code, "stopping": self._stopping}

    def log_tail(self, lines: int = 30) -> str:
        return "".join(list(self._lines)[-lines:])

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """Stop the worker gracefully (worker/server.py): SIGTERM starts its drain - nothing new, running requests
        finish, leases wait to be pulled, for its `transfer.drain_timeout_s` at most; if it still runs after
        `timeout_s`, SIGINT ends the drain at once (its decode requests move to other workers); SIGKILL after
        KILL_AFTER_S more. Returns the exit code."""
        self._stopping = True
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGINT, KILL_AFTER_S), (signal.SIGKILL, None)):
            if self._proc.poll() is not None:
                break
            self._proc.send_signal(sig)
            try:
                self._proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(self._dir, ignore_errors=True)
        return self._proc.returncode

    def _pump(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.append(line)
            if not self._ready.is_set() and line.startswith("READY "):
                self.address = line.split()[1]
                self._ready.set()
                shutil.rmtree(self._dir, ignore_errors=True)  # the worker has read its config by now
            sys.stdout.write(f"[{self.name}] {line}")  # lands in the actor's Ray log file
            sys.stdout.flush()
        shutil.rmtree(self._dir, ignore_errors=True)  # the worker exited (before or after READY)
