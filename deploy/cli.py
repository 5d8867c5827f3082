"""`disagg`: one command for everything a user does. `disagg <command> --help` explains each flag."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deploy.local import LocalCluster


def cmd_generate(a: argparse.Namespace) -> None:
    from engine.llm import LLM
    from engine.request import SamplingParams

    llm = LLM(a.model, device=a.device, dtype=a.dtype, tensor_parallel_size=a.tensor_parallel_size)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed)
    out = llm.generate(a.prompt, params)[0] if a.raw else llm.chat([{"role": "user", "content": a.prompt}], params)[0]
    llm.close()
    print(out.text)
    print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]", file=sys.stderr)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_serve(a: argparse.Namespace) -> None:
    from deploy.config import ClusterConfig
    from deploy.local import LocalCluster, RestartPolicy, pick_router_port
    from engine.config import ConfigError

    try:
        cfg = ClusterConfig.load(a.config) if a.config else ClusterConfig()
        restart = RestartPolicy(max_restarts=a.max_restarts, window_s=a.restart_window)
        port = pick_router_port(cfg.router.get("host", "127.0.0.1"), a.port or int(cfg.router.get("port", 8000)),
                                explicit=bool(a.port))
    except ConfigError as e:
        raise SystemExit(f"disagg serve: {e}") from None
    extra = (["--model", a.model] if a.model else []) + (["--transfer-backend", a.transfer_backend]
                                                          if a.transfer_backend else [])
    extra += ["--drain-timeout", str(a.drain_timeout)] if a.drain_timeout is not None else []
    extra += ["--tensor-parallel-size", str(a.tensor_parallel_size)] if a.tensor_parallel_size else []
    # SIGTERM (kill, systemd, docker stop) stops the cluster as Ctrl-C does: otherwise this process would die
    # at once and leave the router and the workers running, ports and GPU memory held.
    signal.signal(signal.SIGTERM, _interrupt)
    mode = "co-located" if cfg.colocated else "disaggregated"
    print(f"Starting router + {cfg.prefill.replicas} prefill + {cfg.decode.replicas} decode worker(s) ({mode}, "
          f"model {a.model or cfg.model}). Loading weights takes a little while...", flush=True)
    with LocalCluster(cfg, a.config, router_port=port, log_dir=a.log_dir, quiet=a.quiet, worker_args=extra,
                      restart=restart) as c:
        _serve_until_stopped(c, a.model or cfg.model)
    print("Stopped.", file=sys.stderr)
    if c.failed:
        raise SystemExit(1)


def _serve_until_stopped(c: LocalCluster, model: str) -> None:
    """Print how to use the cluster, then wait for Ctrl-C / SIGTERM, or for the router to be beyond restarting
    (workers that die are restarted by the cluster's supervision, and never stop it)."""
    import time

    print(f"\nReady: OpenAI-compatible API at {c.url}/v1\n\nTry:\n  curl {c.url}/v1/chat/completions "
          f"-H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"{model}\", \"messages\": "
          f"[{{\"role\": \"user\", \"content\": \"What is the capital of France?\"}}], \"max_tokens\": 32}}'\n"
          f"\nMetrics: {c.url}/metrics   Health: {c.url}/health   Ctrl-C stops every process.", flush=True)
    try:
        while not c.failed:
            time.sleep(0.5)
        print(f"the router cannot be kept running ({c.failed}); stopping the cluster", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nStopping...", file=sys.stderr)


def cmd_deploy(a: argparse.Namespace) -> None:
    from deploy.ray import launcher
    from engine.config import ConfigError

    print(f"Deploying {a.config} on the Ray cluster at {a.address}. Loading weights takes a little while...",
          flush=True)
    try:
        st = launcher.deploy(a.config, address=a.address, namespace=a.namespace, timeout_s=a.timeout)
    except (launcher.DeployError, ConfigError) as e:
        raise SystemExit(f"disagg deploy: {e}") from None
    except (launcher.RayError, TimeoutError, RuntimeError) as e:  # a worker or the router failed to start
        raise SystemExit(f"disagg deploy: failed, nothing is left running:\n{e}") from None
    print(launcher.format_status(st))
    print(f"\nReady: OpenAI-compatible API at {st['router']}/v1 (metrics at {st['router']}/metrics). The deployment "
          f"outlives this command; `disagg status` / `disagg shutdown` with --namespace {st['namespace']}.", flush=True)


def cmd_status(a: argparse.Namespace) -> None:
    import json

    from deploy.ray import launcher

    try:
        st = launcher.status(address=a.address, namespace=a.namespace)
    except (launcher.DeployError, launcher.RayError) as e:
        raise SystemExit(f"disagg status: {e}") from None
    print(json.dumps(st, indent=2, default=str) if a.json else launcher.format_status(st))


def cmd_shutdown(a: argparse.Namespace) -> None:
    from deploy.ray import launcher

    try:
        forced = launcher.shutdown(address=a.address, namespace=a.namespace, timeout_s=a.timeout)
    except (launcher.DeployError, launcher.RayError) as e:
        raise SystemExit(f"disagg shutdown: {e}") from None
    extra = f" (killed without draining: {', '.join(forced)})" if forced else ""
    print(f"Stopped every actor of Ray namespace {a.namespace}{extra}.", flush=True)


def _add_ray_flags(x: argparse.ArgumentParser, namespace_default: str | None) -> None:
    x.add_argument("--address", default="auto", help="Ray cluster address, e.g. 10.0.0.5:6379 (default auto: the "
                   "cluster `ray start` / `ray up` started on this machine)")
    x.add_argument("--namespace", default=namespace_default, help="Ray namespace of the deployment's actors "
                   f"(default {namespace_default or 'the config ray.namespace, else disagg'})")


def cmd_worker(a: argparse.Namespace) -> None:
    from worker.server import main

    main(a.args)


def cmd_router(a: argparse.Namespace) -> None:
    from router.server import main

    main(a.args)


def cmd_bench(a: argparse.Namespace) -> None:
    from benchmarks.serving import main

    main(a.args)


def cmd_profile(a: argparse.Namespace) -> None:
    from benchmarks.profiler import main

    main(a.args)


def cmd_simulate(a: argparse.Namespace) -> None:
    from simulator.cli import main

    main(a.args)


def _add_ray_commands(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("deploy", help="start router + pools as detached Ray actors on a Ray cluster, with autoscaling")
    d.add_argument("--config", required=True, help="cluster YAML (see deploy/configs/ray*.yaml)")
    _add_ray_flags(d, None)
    d.add_argument("--timeout", type=float, help="seconds to wait for every replica to serve (default: the config's "
                   "ray.startup_timeout_s)")
    d.set_defaults(fn=cmd_deploy)

    st = sub.add_parser("status", help="pools, replicas, health, load and recent scale decisions of a Ray deployment")
    _add_ray_flags(st, "disagg")
    st.add_argument("--json", action="store_true", help="print the raw status as JSON")
    st.set_defaults(fn=cmd_status)

    sd = sub.add_parser("shutdown", help="drain and stop every actor of a Ray deployment")
    _add_ray_flags(sd, "disagg")
    sd.add_argument("--timeout", type=float, default=600.0, help="seconds running requests get to finish (default 600)")
    sd.set_defaults(fn=cmd_shutdown)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disagg", description="Disaggregated prefill/decode LLM serving.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="one offline completion with the engine (no servers)")
    g.add_argument("--prompt", required=True, help="the user message (chat-templated unless --raw)")
    g.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    g.add_argument("--model", default="smollm2", help="smollm2 (packaged), an HF folder or a .gguf file")
    g.add_argument("--max-tokens", type=int, default=64, help="most new tokens (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed")
    g.add_argument("--device", default="cpu", help="torch device (default cpu)")
    g.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    g.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N", help="split the model across N ranks "
                   "(processes, one device each; default 1)")
    g.set_defaults(fn=cmd_generate)

    s = sub.add_parser("serve", help="start router + prefill + decode workers locally; Ctrl-C stops them")
    s.add_argument("--config", help="cluster YAML (see deploy/configs/); default: 1 prefill + 1 decode, SmolLM2")
    s.add_argument("--port", type=int, default=0, help="router HTTP port; if it is in use the command fails "
                   "(default: the config's router.port, else 8000, and if that one is in use a free port, printed)")
    s.add_argument("--model", help="override the config's model for every worker")
    s.add_argument("--transfer-backend", choices=["nixl", "tcp"], help="override the KV transfer backend")
    s.add_argument("--log-dir", help="also write each process's log to DIR/<name>.log")
    s.add_argument("--quiet", action="store_true", help="do not echo worker/router logs to the terminal")
    s.add_argument("--max-restarts", type=int, default=5, metavar="N", help="a worker (or the router) that exits "
                   "is restarted, after a backoff of 1, 2, 4... up to 30 s; after N restarts within --restart-window "
                   "a worker is left down (its pool goes on smaller) and a router ends the cluster (default 5)")
    s.add_argument("--restart-window", type=float, default=600.0, metavar="SECONDS",
                   help="the window --max-restarts counts restarts in (default 600)")
    s.add_argument("--drain-timeout", type=float, metavar="SECONDS", help="a worker sent SIGTERM finishes its "
                   "requests for this long at most, then the router moves the rest to other workers (default: the "
                   "config's transfer.drain_timeout_s, else 60)")
    s.add_argument("--tensor-parallel-size", type=int, metavar="N", help="split the model of every worker across N "
                   "ranks (processes, one device each; docs/parallel.md) (default: each pool's tensor_parallel_size "
                   "in the config, else engine.tensor_parallel_size, else 1)")
    s.set_defaults(fn=cmd_serve)

    _add_ray_commands(sub)
    for name, fn, text in [("worker", cmd_worker, "run one worker process (see `disagg worker --help`)"),
                           ("router", cmd_router, "run the router alone (see `disagg router --help`)"),
                           ("bench", cmd_bench, "load-test an OpenAI endpoint (see `disagg bench --help`)"),
                           ("profile", cmd_profile, "measure one worker's costs into a profile for the simulator "
                            "(see `disagg profile --help`)"),
                           ("simulate", cmd_simulate, "simulate a cluster YAML on profiled hardware under a workload "
                            "(see `disagg simulate --help`)")]:
        x = sub.add_parser(name, help=text, add_help=False)
        x.add_argument("args", nargs=argparse.REMAINDER)
        x.set_defaults(fn=fn)
    return p


PASSTHROUGH = {"worker": cmd_worker, "router": cmd_router, "bench": cmd_bench, "profile": cmd_profile,
               "simulate": cmd_simulate}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        # Everything after the command is that tool's own command line (its --help included); argparse's
        # REMAINDER would stop at a leading option ("disagg profile --help": unrecognized arguments).
        rest = argv[1:]
        PASSTHROUGH[argv[0]](argparse.Namespace(args=rest[1:] if rest[:1] == ["--"] else rest))
        return
    a = build_parser().parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main()
