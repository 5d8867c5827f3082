"""A simulation's result as a one-screen summary and a PNG of its timeline."""

from __future__ import annotations

from typing import Any


def summary_line(result: dict[str, Any]) -> str:
    s = result["summary"]
    pools = ", ".join(f"{r} started {p['started']} ({p['gpu_hours'] or p['replica_hours']:.2f} "
                      f"{'GPU' if p['gpus_per_replica'] else 'replica'}-h)" for r, p in result["pools"].items())
    return (f"{s['completed']}/{s['arrived']} done ({s['failed']} failed, {s['unfinished']} unfinished), "
            f"TTFT p50/p99 {s['ttft_p50_ms']}/{s['ttft_p99_ms']} ms, ITL p50/p99 {s['itl_p50_ms']}/{s['itl_p99_ms']} "
            f"ms, SLO met {s['slo_met_fraction']}, goodput {s['goodput_req_s']} req/s, {s['output_tok_s']} tok/s; "
            f"{pools}; {len(result['decisions'])} scale decisions")


def plot_timeline(result: dict[str, Any], path: str, title: str) -> None:
    """Four panels over time: offered load and mix, replicas per pool, tail latencies, SLO attainment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["timeline"]
    if not rows:
        return
    hours = [r["t"] / 3600 for r in rows]
    fig, ax = plt.subplots(4, 1, figsize=(11, 11), sharex=True)
    ax[0].plot(hours, [r["arrivals_s"] for r in rows], label="arrivals/s")
    ax[0].set(ylabel="req/s", title=title)
    mix = ax[0].twinx()
    mix.plot(hours, [r["prompt_mean"] for r in rows], "g:", label="mean prompt")
    mix.plot(hours, [(r["output_mean"] or 0) * 10 for r in rows], "m:", label="mean output x10")
    mix.set(ylabel="tokens")
    _legend(ax[0], mix)
    for role in ("prefill", "decode"):
        if rows[0].get(role):
            ax[1].plot(hours, [r[role]["ready"] for r in rows], label=f"{role} ready")
            ax[1].plot(hours, [r[role]["ready"] + r[role]["starting"] for r in rows], "--", label=f"{role} + starting")
    ax[1].set(ylabel="replicas")
    ax[1].legend(fontsize=8)
    ax[2].plot(hours, [r["ttft_p99_ms"] for r in rows], label="TTFT p99")
    ax[2].plot(hours, [r["itl_p99_ms"] for r in rows], label="ITL p99")
    slo = result["summary"]["slo"]
    ax[2].axhline(slo["ttft_ms"], color="C0", ls=":", lw=1)
    ax[2].axhline(slo["itl_ms"], color="C1", ls=":", lw=1)
    ax[2].set(ylabel="ms", yscale="log")
    ax[2].legend(fontsize=8)
    ax[3].plot(hours, [r["slo_met"] for r in rows], label="requests meeting the SLO")
    ax[3].set(ylabel="fraction", xlabel="hours", ylim=(min(0.9, min((r["slo_met"] or 1) for r in rows)), 1.001))
    ax[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _legend(a: Any, b: Any) -> None:
    h1, l1 = a.get_legend_handles_labels()
    h2, l2 = b.get_legend_handles_labels()
    a.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
