"""`router.processes: N`: N router processes behind one port.

Each process is a whole router (tokenizer, worker registry with its own KV-event index, token streams to every
decode worker, HTTP server) listening on its own socket bound with SO_REUSEPORT to the same address, so the kernel
spreads incoming connections over them. The first process starts the others and restarts any that dies (with
backoff); they die with it (PR_SET_PDEATHSIG). Request counters and latency histograms are summed across processes
through Prometheus' multiprocess mode (router/metrics.py): the first process creates PROMETHEUS_MULTIPROC_DIR
before any metric exists and removes it at exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CHILD_ENV = "DISAGG_ROUTER_PROCESS"  # set in the processes the first one starts: their index


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port that other processes may bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def die_with_parent() -> None:
    """Linux: this process gets SIGTERM when the process that started it exits, however it exits."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def child_index() -> int:
    """0 in the first router process (or the only one), 1.. in the others."""
    return int(os.environ.get(CHILD_ENV, "0"))


class Siblings:
    """The first process's view of the others: starts them, restarts them when they die, stops them at exit."""

    def __init__(self, count: int, argv: list[str]) -> None:
        self.count, self.argv = count, argv
        self.procs: dict[int, subprocess.Popen] = {}
        self._stop = threading.Event()
        self._dir: str | None = None

    def prepare(self) -> None:
        """Before any metric exists in this process: the shared directory of multiprocess metrics."""
        if self.count > 1 and not os.environ.get(MULTIPROC_ENV):
            self._dir = tempfile.mkdtemp(prefix="disagg-router-metrics-")
            os.environ[MULTIPROC_ENV] = self._dir

    def start(self) -> None:
        for i in range(1, self.count):
            self._spawn(i)
        if self.count > 1:
            threading.Thread(target=self._watch, daemon=True, name="router-siblings").start()

    def _spawn(self, index: int) -> None:
        env = dict(os.environ, **{CHILD_ENV: str(index)})
        self.procs[index] = subprocess.Popen([sys.executable, "-m", "router", *self.argv], env=env,
                                             preexec_fn=die_with_parent)

    def _watch(self) -> None:
        backoff: dict[int, float] = {}
        while not self._stop.wait(0.5):
            for i, p in list(self.procs.items()):
                if p.poll() is None or self._stop.is_set():
                    continue
                delay = min(30.0, backoff.get(i, 0.5) * 2)
                backoff[i] = delay
                log.error("router process %d exited with code %s; restarting it in %.1fs", i, p.returncode, delay)
                time.sleep(delay)
                if not self._stop.is_set():
                    self._spawn(i)

    def stop(self) -> None:
        self._stop.set()
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
