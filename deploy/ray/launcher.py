"""`disagg deploy | status | shutdown`: drive a deployment on a Ray cluster from any machine that can reach it.

`deploy` starts the router actors (`router.processes` of them, sharing the served port), then the planner actor,
which starts the pools' worker actors and registers them with every router. All are detached and named in the
deployment's namespace, so they outlive the driver; `status` and `shutdown` find them again by name. Routers and
the planner are restarted by Ray when they die (`max_restarts=-1`) and rebuild their state from the worker actors;
worker actors are not (the planner replaces a dead one with a new replica).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import ray
import yaml
from ray.exceptions import RayError

from deploy.config import ClusterConfig
from deploy.ray.planner_actor import PLANNER_NAME, ROUTER_NAME, PlannerActor
from deploy.ray.router_actor import RouterActor
from deploy.ray.routers import router_name

log = logging.getLogger("disagg.deploy")

__all__ = ["DeployError", "RayError", "deploy", "format_status", "shutdown", "status"]

CONTROL_TIMEOUT_S = 60.0  # deadline of a status call, and extra slack on top of the configured timeouts


class DeployError(RuntimeError):
    """The deployment cannot be started, found or stopped; the message says why and what to do."""


def connect(address: str, namespace: str) -> None:
    """Join the Ray cluster at `address` ("auto": the one started on this machine) as a driver in `namespace`."""
    if ray.is_initialized():
        ray.shutdown()
    try:
        ray.init(address=address, namespace=namespace, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise DeployError(f"cannot connect to the Ray cluster at {address!r}: {e}. Start one with "
                          "`ray start --head` (or `ray up deploy/ray/cluster-*.yaml`), or pass --address") from None


def load(config_path: str) -> tuple[ClusterConfig, dict[str, Any]]:
    """The validated config, and the YAML mapping it came from (what the actors receive)."""
    cfg = ClusterConfig.load(config_path)
    with open(config_path) as f:
        return cfg, yaml.safe_load(f) or {}


def named_actors() -> list[str]:
    return sorted(ray.util.list_named_actors(all_namespaces=False))


def deploy(config_path: str, address: str = "auto", namespace: str | None = None,
           timeout_s: float | None = None) -> dict[str, Any]:
    """Start router + pools on the cluster; returns the planner's status once every replica serves."""
    cfg, raw = load(config_path)
    ns = namespace or cfg.ray.namespace
    connect(address, ns)
    if ROUTER_NAME in named_actors() or PLANNER_NAME in named_actors():
        raise DeployError(f"a deployment already runs in Ray namespace {ns!r}: `disagg shutdown --namespace {ns}` "
                          "it first, or deploy into another --namespace")
    timeout = timeout_s or cfg.ray.startup_timeout_s
    if cfg.router_config().processes > 1 and cfg.router_config().port == 0:
        raise DeployError("router.processes > 1 needs a fixed router.port: the router replicas share it")
    pin = cfg.ray.router_resources
    try:
        routers = [RouterActor.options(name=router_name(i), namespace=ns, lifetime="detached", max_restarts=-1,
                                       **pin.ray_options()).remote(raw)
                   for i in range(cfg.router_config().processes)]
        urls = ray.get([r.start.remote() for r in routers], timeout=timeout)
        log.info("router(s) serving at %s", ", ".join(urls))
        # The planner goes where the router goes (a sliver of each of its custom resources), using no CPU.
        planner = PlannerActor.options(name=PLANNER_NAME, namespace=ns, lifetime="detached", max_restarts=-1,
                                       resources={k: 0.01 for k in pin.custom}).remote(raw, ns)
        return ray.get(planner.start.remote(timeout), timeout=timeout + CONTROL_TIMEOUT_S)
    except BaseException:
        log.error("deploy failed; removing what was started")
        kill_all(timeout_s=CONTROL_TIMEOUT_S)
        raise


def status(address: str = "auto", namespace: str = "disagg") -> dict[str, Any]:
    connect(address, namespace)
    try:
        planner = ray.get_actor(PLANNER_NAME, namespace=namespace)
    except ValueError:
        raise DeployError(f"no deployment in Ray namespace {namespace!r} (actors there: {named_actors()})") from None
    return ray.get(planner.status.remote(), timeout=CONTROL_TIMEOUT_S)


def shutdown(address: str = "auto", namespace: str = "disagg", timeout_s: float = 600.0) -> list[str]:
    """Drain and stop every replica through the planner, then remove every actor of the namespace.

    Returns the actors removed without the planner's drain (none, unless the planner was gone)."""
    connect(address, namespace)
    try:
        planner = ray.get_actor(PLANNER_NAME, namespace=namespace)
        ray.get(planner.shutdown.remote(timeout_s), timeout=timeout_s + CONTROL_TIMEOUT_S)
    except ValueError:
        log.warning("no planner in namespace %r; removing its actors without draining", namespace)
    except RayError as e:
        log.warning("the planner could not drain the pools (%s); removing its actors without draining", e)
    leftovers = [n for n in named_actors() if n != PLANNER_NAME and n.split("-")[0] != ROUTER_NAME]
    kill_all(timeout_s=CONTROL_TIMEOUT_S)
    return leftovers


def kill_all(timeout_s: float) -> None:
    """Kill every named actor of the current namespace and wait until Ray lists none."""
    deadline = time.monotonic() + timeout_s
    while names := named_actors():
        for name in names:
            with contextlib.suppress(ValueError):  # gone between the listing and the lookup
                ray.kill(ray.get_actor(name), no_restart=True)
        if time.monotonic() > deadline:
            raise DeployError(f"actors still alive after {timeout_s:.0f}s: {names}")
        time.sleep(0.2)


def format_status(st: dict[str, Any]) -> str:
    """`disagg status` as text: one row per replica, one line per pool, the latest decisions."""
    lines = [f"Router: {st['router']}/v1   (Ray namespace {st['namespace']}, planner every {st['interval_s']:g}s)"]
    if len(st.get("routers", [])) > 1:
        lines.append(f"Router replicas serving: {len(st['routers'])} ({', '.join(st['routers'])})")
    lines.append("")
    row = "{:<8} {:<11} {:<9} {:<22} {:<7} {:>9} {:>7} {:>7} {:>10} {:>6}"
    lines.append(row.format("POOL", "REPLICA", "STATE", "ADDRESS", "HEALTHY", "IN-FLIGHT", "WAITING", "RUNNING",
                            "QUEUED-TOK", "KV-USE"))
    for role, p in st["pools"].items():
        for r in p["replicas"]:
            load = r.get("load") or {}
            lines.append(row.format(role, r["name"], r["state"], r["address"] or "-", "yes" if r["healthy"] else "no",
                                    r["in_flight"], load.get("num_waiting", "-"), load.get("num_running", "-"),
                                    load.get("queued_prefill_tokens", "-"), f"{load.get('kv_usage', 0.0):.2f}"))
    lines.append("")
    for role, p in st["pools"].items():
        a = p["autoscaling"]
        if a is None:
            how = "fixed size"
        else:
            value = "n/a" if p["value"] is None else f"{p['value']:.4g}"
            how = (f"autoscaling on {a['metric']} = {value} (target {a['target']:g}), "
                   f"[{a['min_replicas']}, {a['max_replicas']}] replicas; last: {p['reason'] or '-'}")
        lines.append(f"{role}: {p['desired']} wanted, {how}; replaced after dying: {p['replaced']}")
        lines += [f"  failed to start: {f.splitlines()[0]}" for f in p["failures"][-3:]]
    if st["decisions"]:
        lines += ["", "Recent scale decisions:"]
        for d in st["decisions"][-10:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(d["time"]))
            lines.append(f"  {stamp} {d['pool']} {d['action']} {d['from']} -> {d['to']}: {d['reason']}")
    return "\n".join(lines)
