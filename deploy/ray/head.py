"""A single-node Ray cluster on 127.0.0.1 only, run as a child process: for tests and trying `disagg deploy` on a
laptop. `ray start --head` alone binds the machine's network address (Ray maps 127.0.0.1 to it on Linux); the
environment in `LOOPBACK_ENV` keeps the head, its workers and every driver that uses it on the loopback device.

    with LocalRayHead(resources={"prefill_slot": 4, "decode_slot": 4}) as head:
        subprocess.run(["disagg", "deploy", "--address", head.address, ...], env=head.env)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from worker.ports import free_port

# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray's single-machine mode, where a node's address is 127.0.0.1.
# RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on SIGTERM, stop at once instead of draining the node for 30 s.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                "RAY_USAGE_STATS_ENABLED": "0"}


class LocalRayHead:
    """`ray start --head --block` as a child in its own session; `stop` ends it and everything it started."""

    def __init__(self, num_cpus: int = 2, num_gpus: int = 0, resources: dict[str, float] | None = None,
                 startup_timeout_s: float = 60.0) -> None:
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.resources = resources or {}
        self.startup_timeout_s = startup_timeout_s
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, **LOOPBACK_ENV}
        # Short path: Ray puts unix sockets under it, and socket paths are limited to ~107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        self.log_path = os.path.join(self.temp_dir, "head.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalRayHead:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def command(self) -> list[str]:
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        return [ray_cli, "start", "--head", "--block", "--port", str(self.port), "--num-cpus", str(self.num_cpus),
                "--num-gpus", str(self.num_gpus), "--resources", json.dumps(self.resources),
                "--ray-client-server-port", str(free_port()), "--dashboard-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()), "--include-dashboard=false",
                "--disable-usage-stats", "--temp-dir", self.temp_dir]

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while "Ray runtime started" not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with code {self.proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray head not up after {self.startup_timeout_s:.0f}s:\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the head (it stops the processes it started), SIGKILL it after `timeout_s`, then anything left
        in its process group."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout_s)
        if self.proc is not None:
            # Stragglers of the process group start_new_session made for the head: only processes we started.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
