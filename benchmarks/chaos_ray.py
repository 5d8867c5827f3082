"""The chaos soak on Ray (`python -m benchmarks.chaos --ray ...`): the same cluster shape (1 prefill + 2 decode
workers, real SmolLM2) deployed with deploy/ray on a single-node Ray head on 127.0.0.1 (deploy/ray/head.py, as
tests/test_ray_deploy.py does), two router replicas serving the one port (`router.processes: 2`), the same request
mix, and on the schedule, besides the worker faults (signals to the worker processes, found through their actors'
`info`), kills of a router replica (`ray.kill` of the actor `router` or `router-1`; Ray restarts it).

What differs from the local soak (benchmarks/chaos.py), and why:
  * a worker that exits is not restarted under its name: the planner drops its actor and starts a replacement
    (decode-2, ...); requests that find no decode worker wait for it (`router.no_worker_wait_s`, long enough for
    Ray to place the actor and the worker to load the model);
  * a stream cut by a router replica's kill is lost with its TCP connection: it is counted as `cut_by_router_kill`
    (a connection error while a kill was in effect, chaos.cut_by_router_kill), not as an error;
  * migrations are summed over every router replica's counter, read from inside the actors; a replica's count
    since its last reading before a kill is lost with it (the figure is a lower bound);
  * the router's memory is watched per replica process (a restarted one starts afresh);
  * after shutdown, no process of the run may be left: neither a worker or router seen during the run, nor
    anything in the Ray head's session.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import yaml

from benchmarks.chaos import (
    LOAD_KEYS,
    Deployment,
    SoakConfig,
    _alive,
    _plain,
    cluster_yaml,
    idle,
    references,
    run_phase,
    tally_after,
    worker_load,
)
from benchmarks.chaos_faults import RayTarget
from benchmarks.chaos_load import make_specs
from deploy.ray.head import LOOPBACK_ENV, LocalRayHead, free_port

os.environ.update(LOOPBACK_ENV)  # before Ray is imported: this process is a driver of the head on 127.0.0.1 too

import ray  # noqa: E402
from ray.exceptions import RayError  # noqa: E402

log = logging.getLogger("chaos")

NS = "disagg-chaos"  # the deployment's Ray namespace
ROUTERS = ["router", "router-1"]  # the router replicas' actor names (deploy/ray/routers.py router_name)
# A request that finds no healthy decode worker waits this long: Ray's replacement for a killed one needs a planner
# tick (5 s), the actor's placement and the model's load, which under this load can take a minute or more.
NO_WORKER_WAIT_S = 150.0


def ray_cluster_yaml(cfg: SoakConfig, port: int) -> dict[str, Any]:
    """The local soak's cluster (chaos.cluster_yaml) as a Ray deployment: custom resources stand in for node types."""
    out = cluster_yaml(cfg)
    out["router"] = {**out["router"], "port": port, "processes": len(ROUTERS), "no_worker_wait_s": NO_WORKER_WAIT_S}
    out["pools"] = {role: {**pool, "resources": {"num_cpus": 0, "custom": {f"{role}_slot": 1}}}
                    for role, pool in out["pools"].items()}
    out["ray"] = {"namespace": NS, "router_resources": {"num_cpus": 0}, "startup_timeout_s": 300,
                  "drain_timeout_s": 30}
    return out


class RayCluster:
    """A Ray head, the deployment on it, and this process as a driver; `close` stops all and looks for leftovers."""

    def __init__(self, cfg: SoakConfig, workdir: str) -> None:
        self.cfg, self.workdir = cfg, workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Slots to spare: a dead worker's actor holds its slot until the planner removes it, while its replacement
        # already asks for one.
        self.head = LocalRayHead(num_cpus=2, resources={"prefill_slot": 16, "decode_slot": 16})
        self.target = RayTarget(self.url, NS, ROUTERS)
        self.deployed = False
        self.leftovers: list[int] = []  # processes of the run alive after `close`

    def __enter__(self) -> RayCluster:
        path = os.path.join(self.workdir, "chaos-ray.yaml")
        Path(path).write_text(yaml.safe_dump(ray_cluster_yaml(self.cfg, self.port)))
        try:
            self.head.start()
            t0 = time.monotonic()
            r = self.cli("deploy", "--config", path, timeout=900)
            self.deployed = True  # even a failed deploy may have left actors: shut them down in any case
            if r.returncode != 0:
                raise RuntimeError(f"disagg deploy failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
            log.info("deployed on Ray in %.0fs", time.monotonic() - t0)
            ray.init(address=self.head.address, namespace=NS, log_to_driver=False, logging_level=logging.WARNING)
            self.target.pids_seen.add(ray.get(ray.get_actor("planner").pid.remote(), timeout=60))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cli(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """The `disagg` CLI as a separate driver, the way a user runs it."""
        cmd = [sys.executable, "-m", "deploy.cli", *args, "--address", self.head.address]
        return subprocess.run(cmd, env=self.head.env, capture_output=True, text=True, timeout=timeout)

    def replaced(self) -> dict[str, int]:
        """Replicas of each pool that died and were replaced (the planner's count)."""
        st = ray.get(ray.get_actor("planner").status.remote(), timeout=60)
        return {role: p["replaced"] for role, p in st["pools"].items()}

    def close(self) -> None:
        """Drain and stop the deployment, stop Ray, then list the run's processes still alive."""
        if ray.is_initialized():
            ray.shutdown()
        if self.deployed:
            r = self.cli("shutdown", "--namespace", NS, "--timeout", "60", timeout=300)
            log.info("disagg shutdown: %s", (r.stdout.strip() or r.stderr[-2000:]))
        self._keep_logs()
        session = self.head.proc.pid if self.head.proc is not None else None
        self.head.stop()  # SIGTERM, then SIGKILL of its process group
        time.sleep(1.0)
        self.leftovers = sorted({p for p in self.target.pids_seen if _alive(p)} | set(session_members(session)))

    def _keep_logs(self) -> None:
        """The actors' output (workers, routers, planner) into the workdir: Ray's folder goes with the head."""
        src = Path(self.head.temp_dir) / "session_latest" / "logs"
        dst = Path(self.workdir) / "ray-logs"
        dst.mkdir(exist_ok=True)
        for f in src.glob("worker-*"):
            with contextlib.suppress(OSError):
                if f.stat().st_size > 0:
                    shutil.copy(f, dst / f.name)


def session_members(session: int | None) -> list[int]:
    """Live processes in the session `session` (LocalRayHead starts the head in a new one; what Ray starts stays
    in it unless it makes its own)."""
    if session is None:
        return []
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session and fields[0] != "Z":
                out.append(int(d.name))
    return out


class RouterWatch:
    """Every `every_s`, each router replica's process: its resident memory (MiB, from /proc: same machine) and its
    migrations counter (read inside the actor: an HTTP request would reach whichever replica the kernel picks)."""

    def __init__(self, target: RayTarget, every_s: float = 2.0) -> None:
        self.target, self.every_s, self._began = target, every_s, time.monotonic()
        self.lives: dict[tuple[str, int], dict[str, Any]] = {}  # (replica, pid) -> {"rss": [...], "migrations"}
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="router-watch")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def sample(self) -> None:
        for name in self.target.routers:
            try:
                actor = ray.get_actor(name, namespace=NS)
                # A lambda that refers to nothing of this module: cloudpickle sends it by value (a module function
                # goes by reference, and the actor would have to import this module).
                pid, body = ray.get([actor.pid.remote(), actor.__ray_call__.remote(
                    lambda a: a.app.service.metrics.render()[0])], timeout=5)
            except (RayError, ValueError):  # down or restarting: it is sampled again once back
                continue
            text = body.decode() if isinstance(body, bytes) else body
            m = re.search(r"^disagg_router_migrations_total ([0-9.e+]+)$", text, re.M)
            rss = rss_mib(pid)
            with self._lock:
                life = self.lives.setdefault((name, pid), {"replica": name, "pid": pid, "rss": [], "migrations": 0.0})
                life["migrations"] = float(m.group(1)) if m else 0.0
                if rss is not None:
                    life["rss"].append((round(time.monotonic() - self._began, 1), rss))
            self.target.pids_seen.add(pid)

    def migrations(self) -> float:
        """Every replica process's counter summed (each starts at 0 with its process), read now."""
        self.sample()
        with self._lock:
            return sum(life["migrations"] for life in self.lives.values())

    def stop(self) -> dict[str, Any]:
        """Memory growth of each replica process from the end of its warm-up (first tenth) to its last sample;
        `growth_mib`: the largest among processes sampled at least 10 times."""
        self._stop.set()
        self._thread.join()
        lives = []
        for life in self.lives.values():
            mib = [m for _, m in life["rss"]]
            if len(mib) >= 2:
                warm = mib[max(1, len(mib) // 10)]
                life.update(after_warmup_mib=warm, end_mib=mib[-1], max_mib=max(mib), growth_mib=mib[-1] - warm)
            lives.append({**life, "samples": len(mib)})
        grown = [life["growth_mib"] for life in lives if life["samples"] >= 10]
        return {"growth_mib": max(grown) if grown else None, "processes": lives}


def rss_mib(pid: int) -> float | None:
    try:
        m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return None
    return round(int(m.group(1)) / 1024, 1) if m else None


def worker_loads(target: RayTarget) -> dict[str, dict[str, Any]]:
    """Each worker actor's Load figures (LOAD_KEYS), or its state when its process is not up or does not answer."""
    from deploy.ray.worker_actor import discover

    out: dict[str, dict[str, Any]] = {}
    for info in discover(NS, timeout_s=10):
        target.pids_seen.add(info["pid"])
        if not info["alive"] or not info["address"]:
            out[info["name"]] = {"state": "exited" if not info["alive"] else "starting"}
            continue
        try:
            rep = worker_load(info["address"])
        except grpc.RpcError as e:
            out[info["name"]] = {"state": f"not answering: {e.code().name}"}
            continue
        out[info["name"]] = {k: float(rep.stats.get(k, 0)) for k in LOAD_KEYS} | {"idle": idle(rep)}
    return out


def settle_ray(target: RayTarget, cfg: SoakConfig, timeout_s: float) -> dict[str, dict[str, Any]]:
    """Wait until each pool has its replicas back, every router replica serves again and every worker holds
    nothing (or `timeout_s` passes); each worker's last Load figures."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            loads = worker_loads(target)
        except (RayError, ValueError):  # an actor went between the listing and the lookup
            loads = {}
        roles = collections.Counter(n.split("-")[0] for n, w in loads.items() if w.get("idle"))
        done = loads and roles["prefill"] >= cfg.prefill and roles["decode"] >= cfg.decode and all(
            w.get("idle") for w in loads.values()) and all(target.router_serves(n) for n in target.routers)
        if done or time.monotonic() > deadline:
            return loads
        time.sleep(1.0)


def routers_in_flight(target: RayTarget) -> dict[str, int]:
    """Requests each router replica still counts on its workers (0 once every request has ended)."""
    out = {}
    for name in target.routers:
        snap = ray.get(ray.get_actor(name, namespace=NS).snapshot.remote(), timeout=30)
        out[name] = sum(w["in_flight"] for w in snap["workers"])
    return out


def soak_ray(cfg: SoakConfig, workdir: str) -> dict[str, Any]:
    """The whole soak on Ray (module docstring); returns the report, shaped like chaos.soak's."""
    specs = make_specs(cfg.baseline + cfg.requests, cfg.seed, cfg.mix)
    t0 = time.monotonic()
    refs = references(specs)  # before the cluster competes for the cores
    log.info("%d reference outputs in %.0fs", len(refs), time.monotonic() - t0)
    report: dict[str, Any] = {"config": _plain(cfg), "deployment": "ray", "references": len(refs)}
    cluster = RayCluster(cfg, workdir)
    with cluster:
        watch = RouterWatch(cluster.target)
        dep = Deployment(cluster.url, cluster.target, watch.migrations)
        if cfg.baseline:
            report["baseline"] = run_phase(dep, specs[:cfg.baseline], cfg, refs, faults=False)
        report["chaos"] = run_phase(dep, specs[cfg.baseline:], cfg, refs, faults=True)
        # A worker killed near the end is replaced only after a planner tick and a model load.
        report["workers_after"] = settle_ray(cluster.target, cfg, max(cfg.settle_s, 240.0))
        report["routers_serving_after"] = {n: cluster.target.router_serves(n, timeout_s=30) for n in ROUTERS}
        report["routers_in_flight_after"] = routers_in_flight(cluster.target)
        report["router_rss"] = watch.stop()
        report["replaced"] = cluster.replaced()
    report["leaked_processes"] = cluster.leftovers
    report["router_errors_logged"] = logged_errors(Path(workdir) / "ray-logs")
    return tally_after(report)


# What uvicorn logs when an app raises (the connection is then closed without an answer, which a client sees as a
# lost connection), and the generation front's catch-all (router/fast_path.py).
LOGGED_ERRORS = ("Exception in ASGI application", "unhandled error on")


def logged_errors(folder: Path) -> list[str]:
    """Each router error the actors' logs hold (file name, the line and the last line of its traceback)."""
    found = []
    for f in sorted(folder.glob("worker-*")):
        with contextlib.suppress(OSError):
            lines = f.read_text(errors="replace").splitlines()
            for i, line in enumerate(lines):
                if any(e in line for e in LOGGED_ERRORS):
                    tail = next((t for t in lines[i + 1:i + 80] if t and not t[0].isspace()
                                 and not t.startswith("Traceback")), "")
                    found.append(f"{f.name}: {line.strip()[:200]} / {tail[:300]}")
    return found
