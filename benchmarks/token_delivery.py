"""Where a token's gap grows between the decode worker's step and the router: the decode workers' output batches
(decode_worker/subscriber.py `batch_sent`, in their step logs) paired with their arrival at the routers
(router/arrival_log.py `batch_received`), for benchmarks/sim_validate.py's real runs.

A Subscribe stream delivers its messages in order and whole, so the n-th batch a decode worker handed to one
subscriber is the n-th that subscriber's reader took from that worker; the pairing checks it (each pair must
carry as many chunks). From the pairs: how long a batch took from its hand-over to gRPC to the router's reader
(`delivery_ms`), and the gaps between one request's successive chunks as the worker handed them over and as the
router's reader took them. The router's ITL histogram counts the same gaps one stage later, where its relay to
the client takes each chunk: a tail there beyond `received_share_over` is the router's own relay.
"""

from __future__ import annotations

import os
from typing import Any

from router.arrival_log import ARRIVAL_EVENT, RELAY_EVENT
from simulator.metrics import percentile
from worker.step_log import read_step_events

BOUNDS_MS = (5.0, 10.0, 20.0, 30.0, 50.0)
CLOCK_SLACK_S = 0.001  # an arrival stamped up to this before its batch's hand-over still pairs (clock reads)


def delivery(folder: str, since: float, until: float) -> dict[str, Any] | None:
    """The batches received over [since, until] (Unix seconds) paired with their sending (module docstring):
    `delivery_ms` p50/p90/p99/max, and each request's chunk gaps' share over BOUNDS_MS as sent and as received.
    None when the folder holds no router's arrivals, or they pair with no worker's batches."""
    events = _router_events(folder)
    sent, received = _sent(folder), _received(events)
    pairs = [p for key, got in received.items() for p in _pair(sent, key, got) if since <= p[1]["t"] <= until]
    if not pairs:
        return None
    handed = [_handed(s) for s, _ in pairs]
    late = sorted((float(r["t"]) - h) * 1e3 for h, (_, r) in zip(handed, pairs, strict=True))
    at_sent: dict[str, list[float]] = {}
    at_received: dict[str, list[float]] = {}
    for h, (_, r) in zip(handed, pairs, strict=True):
        for rid in r["requests"]:
            at_sent.setdefault(rid, []).append(h)
            at_received.setdefault(rid, []).append(float(r["t"]))
    return {"batches": len(pairs),
            "delivery_ms": {f"p{q}": round(percentile(late, q), 3) for q in (50, 90, 99)} | {"max": round(late[-1], 3)},
            "bound_ms": list(BOUNDS_MS), "sent_share_over": _shares(at_sent), "received_share_over": _shares(at_received),
            "gaps": sum(len(ts) - 1 for ts in at_received.values()),
            "own_p99_gap_ms": {"sent": _own_p99(at_sent), "received": _own_p99(at_received),
                               "relayed": _own_p99(_relayed(events, since, until))}}


def _sent(folder: str) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Each worker log's `batch_sent` events by (subscriber, worker log), in order."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".jsonl") and not f.startswith("router-"):
            for e in read_step_events(os.path.join(folder, f)):
                if e["event"] == "batch_sent":
                    out.setdefault((str(e["rid"]), f), []).append(e)
    return out


def _router_events(folder: str) -> list[dict[str, Any]]:
    """Every event of the routers' logs in the folder (their arrival logs), file by file, in order."""
    return [e for f in sorted(os.listdir(folder)) if f.startswith("router-") and f.endswith(".jsonl")
            for e in read_step_events(os.path.join(folder, f))]


def _received(events: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Each router's arrivals by (subscriber, worker address), in order."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in events:
        if e["event"] == ARRIVAL_EVENT:
            out.setdefault((str(e["rid"]), str(e["worker"])), []).append(e)
    return out


def _relayed(events: list[dict[str, Any]], since: float, until: float) -> dict[str, list[float]]:
    """Each request ended in [since, until]: when its token outputs were handed on to its response (the routers'
    `tokens_relayed` lines; the first token's included, as the client's gaps include it)."""
    return {str(e["rid"]): [float(t) for t in e["times"]] for e in events
            if e["event"] == RELAY_EVENT and since <= float(e["t"]) <= until}


def _pair(sent: dict[tuple[str, str], list[dict[str, Any]]], key: tuple[str, str], got: list[dict[str, Any]]
          ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The arrivals of one subscription paired with the batches of the worker log whose chunk counts they match,
    n-th with n-th ([] if none matches: a log cut short pairs over the part both hold). Two decode workers may
    send one subscriber batches of the same chunk counts: of those logs, the one whose batches each leave before
    their arrival (one machine's clock) and arrive soonest after, at the median."""
    counts = [len(r["requests"]) for r in got]
    best: tuple[float, list[tuple[dict[str, Any], dict[str, Any]]]] | None = None
    for (subscriber, _), batches in sent.items():
        n = min(len(batches), len(counts))
        if subscriber != key[0] or not n or [int(b["chunks"]) for b in batches[:n]] != counts[:n]:
            continue
        pairs = list(zip(batches[:n], got[:n], strict=True))
        late = sorted(float(r["t"]) - _handed(s) for s, r in pairs)
        if late[0] < -CLOCK_SLACK_S:  # an arrival before its batch was handed over: not this worker's
            continue
        if best is None or late[n // 2] < best[0]:
            best = (late[n // 2], pairs)
    return best[1] if best is not None else []


def _handed(sent: dict[str, Any]) -> float:
    """When a batch was handed to gRPC: its `batch_sent` line is written once the write returned."""
    return float(sent["t"]) - float(sent["write_ms"]) / 1e3


def _shares(times: dict[str, list[float]]) -> list[float]:
    """The share of gaps between a request's successive chunks over each of BOUNDS_MS."""
    gaps = [(b - a) * 1e3 for ts in times.values() for a, b in zip(ts, ts[1:], strict=False)]
    return [round(sum(g > bound for g in gaps) / len(gaps), 4) if gaps else 0.0 for bound in BOUNDS_MS]


def _own_p99(times: dict[str, list[float]]) -> dict[str, Any]:
    """Each request's own p99 gap between its chunks (the goodput SLO's figure, less the handoff's first gap, which
    reaches the router by another path): p50 / p90 / max over the requests, and how many exceed each of BOUNDS_MS.
    Held against the client's per-request figure it says which stage a request's gap SLO was missed in."""
    own = sorted(percentile([(b - a) * 1e3 for a, b in zip(ts, ts[1:], strict=False)], 99)
                 for ts in times.values() if len(ts) > 2)
    if not own:
        return {}
    return {"requests": len(own), **{f"p{q}": round(percentile(own, q), 2) for q in (50, 90)}, "max": round(own[-1], 2),
            "over": [sum(g > bound for g in own) for bound in BOUNDS_MS]}


def brief(d: dict[str, Any]) -> str:
    """`delivery`'s figures in one line."""
    ms = d["delivery_ms"]
    over = [f"{b:g} ms {s:.2%} / {r:.2%}" for b, s, r in zip(d["bound_ms"], d["sent_share_over"],
                                                            d["received_share_over"], strict=True) if b >= 20]
    return (f"{d['batches']} batches, hand-over to the router's reader ms p50/p99/max {ms['p50']:.2f}/{ms['p99']:.2f}/"
            f"{ms['max']:.2f}; chunk gaps over " + ", ".join(over) + " (as sent / as received)"
            + "".join(_brief_own(stage, d.get("own_p99_gap_ms", {}).get(stage, {})) for stage in ("received", "relayed")))


def _brief_own(stage: str, own: dict[str, Any]) -> str:
    if not own:
        return ""
    over = ", ".join(f"{n} over {b:g} ms" for b, n in zip(BOUNDS_MS, own["over"], strict=True) if b >= 20)
    return (f"; a request's own p99 gap as {stage} p50/p90/max {own['p50']:.1f}/{own['p90']:.1f}/{own['max']:.1f} ms "
            f"({over} of {own['requests']})")
