"""Start the cluster as local processes: workers first, then the router; keep them running; stop them all on exit.

Used by `disagg serve` and by the integration tests (the same code path users run).

Supervision (`restart=RestartPolicy(...)`, what `disagg serve` uses): a process that exits while the cluster is
not stopping is started again after a backoff, a worker on the port it had - so the router's health polls find it
again at the address it was given, with no re-registration - and the router with the same worker list. A process
that exits `max_restarts` times within `window_s` is left down: a worker's pool goes on one smaller, while a router
that cannot stay up ends the cluster (`failed` says why), since nothing can be served without it. One dead
worker never stops the others or the router: the router moves its requests elsewhere (router/generation.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import httpx

from deploy.config import ClusterConfig
from engine.config import ConfigError
from engine.cpu_threads import SHARE_ENV
from worker.ports import free_port

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    """When the launcher starts a process that exited on its own again."""

    max_restarts: int = 5  # restarts of one process within window_s; one more exit and it is left down
    window_s: float = 600.0  # the window max_restarts counts in
    backoff_s: float = 1.0  # wait before a restart, doubled for each earlier restart within window_s
    max_backoff_s: float = 30.0  # the longest wait before a restart

    def __post_init__(self) -> None:
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ConfigError(f"max_restarts must be an integer >= 0, got {self.max_restarts!r}")
        if self.window_s <= 0 or self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ConfigError("restart policy needs window_s > 0 and 0 <= backoff_s <= max_backoff_s")

    def delay(self, recent: int) -> float:
        """The wait before restarting a process that has been restarted `recent` times within the window."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** recent)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    address: str = ""
    lines: list[str] = field(default_factory=list)
    state: str = "up"  # up | starting (restarted, not READY yet) | backoff (waiting to restart) | down (given up)
    restarts: list[float] = field(default_factory=list)  # time.monotonic() of each restart
    restart_at: float = 0.0  # when a process in backoff is started again


class LocalCluster:
    """`with LocalCluster(cfg) as c:` starts router + pools; `c.url` is the OpenAI endpoint."""

    def __init__(self, config: ClusterConfig, config_path: str | None = None, router_port: int | None = None,
                 startup_timeout_s: float = 300.0, log_dir: str | None = None, quiet: bool = False,
                 worker_args: list[str] | None = None, restart: RestartPolicy | None = None) -> None:
        if config_path is None and config.router:
            raise ValueError("LocalCluster: the router reads its settings from the config file: pass config_path")
        self.config = config
        self.worker_args = worker_args or []
        self.config_path = config_path
        self.router_port = router_port if router_port is not None else int(config.router.get("port", 8000))
        self.timeout = startup_timeout_s
        self.log_dir = log_dir
        self.quiet = quiet
        self.restart = restart
        self.procs: dict[str, Proc] = {}
        self.pids: list[int] = []  # every process ever started, restarts included (tests check none outlives stop)
        self.failed = ""  # why the cluster cannot go on (the router could not be kept up); "" while it can
        self._lock = threading.Lock()  # supervision vs. stop(): no restart starts once stopping has begun
        self._stopping = threading.Event()
        # One file per cluster through which its workers share the machine's cores (engine/cpu_threads.py).
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        self.cpu_share = os.path.join(shm, f"disagg-cores-{self.router_port}")
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
        _remove(self.cpu_share)  # a crashed launcher's: its slots would only name dead or reused pids
        names = [f"prefill-{i}" for i in range(self.config.prefill.replicas)]
        names += [f"decode-{i}" for i in range(self.config.decode.replicas)]
        for name in names:
            self.start_worker(name)
        for name in names:
            self.wait_worker(name)
        self.start_router()
        if self.restart is not None:
            threading.Thread(target=self._supervise, daemon=True, name="supervisor").start()

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
            if _ready_address(p):
                return p.address
            if p.popen.poll() is not None:
                raise RuntimeError(f"{name} exited with code {p.popen.returncode}:\n" + "".join(p.lines[-30:]))
            time.sleep(0.1)
        raise TimeoutError(f"{name} not ready after {self.timeout:.0f}s")

    def router_cmd(self) -> list[str]:
        cmd = [sys.executable, "-m", "router", "--port", str(self.router_port)]
        cmd += ["--config", self.config_path] if self.config_path else ["--model-name", self.config.model]
        for name, p in self.procs.items():
            if name.startswith(("prefill", "decode")):
                cmd += ["--worker", p.address]
        return cmd

    def start_router(self) -> None:
        self.procs["router"] = self._spawn("router", self.router_cmd())
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
        """Send `sig` to a process; for SIGKILL, SIGTERM and SIGINT also wait until it has exited."""
        p = self.procs[name]
        p.popen.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            p.popen.wait(timeout=None if sig != signal.SIGKILL else 30)

    def send(self, name: str, sig: int) -> None:
        """Send `sig` to a process without waiting (SIGSTOP, SIGCONT, or a SIGTERM whose drain runs on)."""
        p = self.procs[name]
        if p.popen.poll() is None:
            p.popen.send_signal(sig)

    def stop(self) -> None:
        """Stop supervising, then the router (so no new work lands), then the workers; SIGKILL what lingers.

        Workers get SIGTERM and then SIGINT: the second signal ends their drain at once, since with the router gone
        there is no one to finish requests for or to move them to."""
        self._stopping.set()
        with self._lock:  # a restart in progress has finished spawning; none starts after this
            pass
        router = self.procs.get("router")
        if router is not None:
            _terminate([router], (signal.SIGTERM,), 10)
        workers = [p for n, p in self.procs.items() if n != "router"]
        _terminate(workers, (signal.SIGTERM, signal.SIGINT), 10)
        _remove(self.cpu_share)

    # ---- supervision -----------------------------------------------------------------------------------------
    def _supervise(self) -> None:
        while not self._stopping.wait(0.2):
            with self._lock:
                if self._stopping.is_set():
                    return
                for name in list(self.procs):
                    try:
                        self._check(name, time.monotonic())
                    except Exception:  # one bad restart must not end supervision of the others
                        log.exception("supervising %s failed", name)

    def _check(self, name: str, now: float) -> None:
        p = self.procs[name]
        if p.state == "starting" and _ready_address(p):
            p.state = "up"
            log.warning("%s is back at %s (restart %d)", name, p.address, len(p.restarts))
        elif p.state in ("up", "starting") and p.popen.poll() is not None:
            self._exited(p, now)
        elif p.state == "backoff" and now >= p.restart_at:
            self._respawn(p, now)

    def _exited(self, p: Proc, now: float) -> None:
        assert self.restart is not None
        recent = [t for t in p.restarts if now - t < self.restart.window_s]
        what = f"{p.name} (pid {p.popen.pid}) exited with code {p.popen.returncode}"
        if len(recent) >= self.restart.max_restarts:
            p.state = "down"
            if p.name == "router":
                self.failed = f"{what}; restarted {len(recent)} time(s) in {self.restart.window_s:g}s: giving up"
                log.error("%s", self.failed)
                return
            role = p.name.split("-")[0]
            left = sum(1 for q in self.procs.values() if q.name.startswith(role) and q.state != "down")
            log.error("%s; restarted %d time(s) in %gs: leaving it down, the %s pool goes on with %d worker(s)",
                      what, len(recent), self.restart.window_s, role, left)
            return
        p.state, p.restart_at = "backoff", now + self.restart.delay(len(recent))
        log.warning("%s; restarting it in %.1fs%s", what, p.restart_at - now,
                    f" on {p.address}" if p.address else "")

    def _respawn(self, p: Proc, now: float) -> None:
        if p.name == "router":
            cmd = self.router_cmd()
        else:
            cmd = self.worker_cmd(p.name, int(p.address.rsplit(":", 1)[1]) if p.address else 0)
        q = self._spawn(p.name, cmd)
        q.address, q.restarts, q.state = p.address, [*p.restarts, now], "starting"
        if p.name == "router":
            q.state = "up"  # it binds its port before anything else: an exit shows as an exit
        self.procs[p.name] = q

    # ---- plumbing --------------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> Proc:
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
        if name != "router":
            env.setdefault(SHARE_ENV, self.cpu_share)  # exported empty: no share
        log.info("starting %s: %s", name, " ".join(cmd))
        popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.pids.append(popen.pid)
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


def _ready_address(p: Proc) -> bool:
    """Whether the worker printed its READY line (then `p.address` is set from it)."""
    ready = next((ln for ln in list(p.lines) if ln.startswith("READY ")), None)
    if ready:
        p.address = ready.split()[1]
    return ready is not None


def _terminate(procs: list[Proc], signals: tuple[int, ...], timeout_s: float) -> None:
    """Send each live process `signals` in turn (SIGCONT first: a stopped process cannot act on a signal), wait up
    to `timeout_s` for all, SIGKILL the rest."""
    live = [p for p in procs if p.popen.poll() is None]
    for p in live:
        p.popen.send_signal(signal.SIGCONT)
        for sig in signals:
            p.popen.send_signal(sig)
    deadline = time.monotonic() + timeout_s
    for p in live:
        try:
            p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not stop in %gs: killing it", p.name, p.popen.pid, timeout_s)
            p.popen.kill()
            p.popen.wait()


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now. SO_REUSEADDR as the router sets it, so connections of a
    router that just stopped (TIME_WAIT) do not count as busy; a socket listening there does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError:
            return False
    return True


def pick_router_port(host: str, port: int, explicit: bool) -> int:
    """`port` if a server can listen on it. Busy: an `explicit` port (given on the command line) is an error
    (ConfigError); otherwise another free port is taken, with a warning that says so."""
    if port_free(host, port):
        return port
    if explicit:
        raise ConfigError(f"port {port} on {host} is in use by another process (is a cluster already running?); "
                          "stop it or pass another --port")
    other = free_port(host if host not in ("0.0.0.0", "::", "") else "127.0.0.1")
    log.warning("port %d on %s is in use; the router serves on port %d instead (pass --port to insist on one)",
                port, host, other)
    return other
