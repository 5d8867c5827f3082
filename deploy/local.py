"""Start the cluster as local processes: workers first, then the router; stop them all on exit.

Used by `disagg serve` and by the integration tests (the same code path users run).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

from deploy.config import ClusterConfig
from worker.server import free_port

log = logging.getLogger(__name__)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    address: str = ""
    lines: list[str] = field(default_factory=list)


class LocalCluster:
    """`with LocalCluster(cfg) as c:` starts router + pools; `c.url` is the OpenAI endpoint."""

    def __init__(self, config: ClusterConfig, config_path: str | None = None, router_port: int | None = None,
                 startup_timeout_s: float = 300.0, log_dir: str | None = None, quiet: bool = False,
                 worker_args: list[str] | None = None) -> None:
        if config_path is None and config.router:
            raise ValueError("LocalCluster: the router reads its settings from the config file: pass config_path")
        self.config = config
        self.worker_args = worker_args or []
        self.config_path = config_path
        self.router_port = router_port if router_port is not None else int(config.router.get("port", 8000))
        self.timeout = startup_timeout_s
        self.log_dir = log_dir
        self.quiet = quiet
        self.procs: dict[str, Proc] = {}
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)

    @property
    def url(self) -> str:
        host = self.config.router.get("host", "127.0.0.1")
        return f"http://{host}:{self.router_port}"

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        names = [f"prefill-{i}" for i in range(self.config.prefill.replicas)]
        names += [f"decode-{i}" for i in range(self.config.decode.replicas)]
        for name in names:
            self.start_worker(name)
        for name in names:
            self.wait_worker(name)
        self.start_router()

    def worker_cmd(self, name: str, port: int) -> list[str]:
        role, idx = name.split("-")
        pool = getattr(self.config, role)
        port = port or (pool.base_port + int(idx) if pool.base_port else 0)
        cmd = [sys.executable, "-m", "worker", "--role", role, "--worker-id", name, "--port", str(port)]
        if self.config_path:
            cmd += ["--config", self.config_path]
        return cmd + self.worker_args

    def start_worker(self, name: str, port: int = 0) -> None:
        """Start (or restart on `port`) one worker process; `wait_worker` waits for its READY line."""
        self.procs[name] = self._spawn(name, self.worker_cmd(name, port))

    def wait_worker(self, name: str) -> str:
        p = self.procs[name]
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            ready = next((ln for ln in list(p.lines) if ln.startswith("READY ")), None)
            if ready:
                p.address = ready.split()[1]
                return p.address
            if p.popen.poll() is not None:
                raise RuntimeError(f"{name} exited with code {p.popen.returncode}:\n" + "".join(p.lines[-30:]))
            time.sleep(0.1)
        raise TimeoutError(f"{name} not ready after {self.timeout:.0f}s")

    def start_router(self) -> None:
        cmd = [sys.executable, "-m", "router", "--port", str(self.router_port)]
        cmd += ["--config", self.config_path] if self.config_path else ["--model-name", self.config.model]
        for name, p in self.procs.items():
            if name.startswith(("prefill", "decode")):
                cmd += ["--worker", p.address]
        self.procs["router"] = self._spawn("router", cmd)
        self.wait_ready()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.timeout)
        router = self.procs["router"]
        while time.monotonic() < deadline:
            if router.popen.poll() is not None:
                raise RuntimeError("router exited:\n" + "".join(router.lines[-30:]))
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"router not ready after {timeout_s or self.timeout:.0f}s")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs[name]
        p.popen.send_signal(sig)
        p.popen.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM everything (router first so no new work lands), then SIGKILL what lingers."""
        order = ["router"] + [n for n in self.procs if n != "router"]
        for name in order:
            p = self.procs.get(name)
            if p and p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for name in order:
            p = self.procs.get(name)
            if p is None:
                continue
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()

    # ---- plumbing --------------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> Proc:
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
        log.info("starting %s: %s", name, " ".join(cmd))
        popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        proc = Proc(name, popen)
        threading.Thread(target=self._pump, args=(proc,), daemon=True, name=f"log-{name}").start()
        return proc

    def _pump(self, proc: Proc) -> None:
        logf = open(os.path.join(self.log_dir, f"{proc.name}.log"), "a") if self.log_dir else None  # noqa: SIM115
        assert proc.popen.stdout is not None
        for line in proc.popen.stdout:
            proc.lines.append(line)
            del proc.lines[:-500]
            if logf:
                logf.write(line)
                logf.flush()
            if not self.quiet:
                sys.stderr.write(f"[{proc.name}] {line}")
        if logf:
            logf.close()


def pick_router_port(preferred: int) -> int:
    """The preferred port when free, else any free one."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()
