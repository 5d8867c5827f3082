"""Simulated against real, as a picture: per rate and mode of a sim_validate JSON, the distribution (CDF) of each
request's TTFT and of its own p99 inter-token gap (the goodput SLO's two figures), real and simulated on one axis,
the SLOs as lines.

    python -m benchmarks.validation_plot benchmarks/results/sim_validate_....json [--out PNG]

sim_validate writes it beside its JSON; this draws it again for any JSON it wrote (recorded runs included).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

TTFT, GAP = 2, 4  # columns of requests_each: [prompt, output, TTFT ms, e2e ms, own p99 gap ms, first gap ms]


def cases(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(title, row) for every rate and mode with both a real and a simulated run's requests."""
    return [(f"{mode} at {rate} req/s", row) for rate, modes in report["rates"].items() for mode, row in modes.items()
            if (row.get("real") or {}).get("requests_each") and row["sim"].get("requests_each")]


def cdf(values: list[float]) -> tuple[list[float], list[float]]:
    xs = sorted(values)
    return xs, [(i + 1) / len(xs) for i in range(len(xs))]


def plot(report: dict[str, Any], path: str) -> bool:
    """Draw the report's cases into `path`; False (and nothing written) when none has both runs' requests."""
    found = cases(report)
    if not found:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slo = report.get("args", {})
    fig, axes = plt.subplots(len(found), 2, figsize=(11, 2.8 * len(found)), squeeze=False)
    for (title, row), (left, right) in zip(found, axes, strict=True):
        for ax, col, name, bound in ((left, TTFT, "TTFT ms", slo.get("slo_ttft_ms")),
                                     (right, GAP, "a request's own p99 gap ms", slo.get("slo_itl_ms"))):
            for kind, style in (("real", "k-"), ("sim", "C1--")):
                ax.plot(*cdf([q[col] for q in row[kind]["requests_each"]]), style, lw=1.3,
                        label="real" if kind == "real" else "simulated")
            if bound:
                ax.axvline(bound, color="r", lw=0.8, ls=":", label=f"SLO {bound:g} ms")
            ax.set(xlabel=name, ylabel="share of requests", title=title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", help="a JSON sim_validate wrote")
    p.add_argument("--out", help="the PNG (default: the JSON's path with .png)")
    a = p.parse_args(argv)
    try:
        with open(a.report) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        p.error(f"{a.report}: {e}")
    if "rates" not in report:
        p.error(f"{a.report}: not a sim_validate report (no 'rates')")
    out = a.out or a.report.removesuffix(".json") + ".png"
    try:
        drawn = plot(report, out)
    except (KeyError, IndexError, TypeError, AttributeError) as e:  # rows or sections not as sim_validate writes them
        p.error(f"{a.report}: not a sim_validate report ({type(e).__name__}: {e})")
    if not drawn:
        p.error(f"{a.report}: no rate has both a real and a simulated run's requests")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
