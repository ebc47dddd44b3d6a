"""The benchmark's table and chart, from the results dictionary."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness import Measurement
    from run import Setup

__all__ = ["chart", "progress", "rows", "table"]

RESULTS_BASELINE = {"results-prefork": "ours-prefork", "results-solo": "ours-solo"}


def progress(
    round_: int,
    repeat: int,
    broker: str,
    setup: Setup,
    result: Measurement,
    queued: int | None = None,
) -> str:
    """One line per run, printed as the benchmark goes."""
    what = f"[{round_}/{repeat}] {broker:<15} {setup.label}"
    if queued:
        what += f" ({queued} queued)"
    if result.error:
        tail = "\n    ".join(result.log_tail.splitlines()[-8:])
        return f"{what}: FAILED, {result.error}\n    {tail}".rstrip()
    batch = f", batch {result.mean_batch:.1f}" if setup.impl != "bare" else ""
    return (
        f"{what}: {result.rate:,.0f} msg/s ({result.processed:,} processed in "
        f"{result.seconds:.1f}s){batch}, peak RSS {result.peak_rss / 2**20:.0f} MiB"
    )


def rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per broker and setup that has a median."""
    out = []
    for broker, info in data["brokers"].items():
        setups = info.get("setups", {})
        bare = setups.get("bare", {}).get("rate")
        for key, summary in setups.items():
            if "rate" not in summary:
                continue
            label = data["setups"].get(key, {}).get("label", key)
            out.append(
                {
                    "broker": broker,
                    "setup": key,
                    "label": label,
                    "rate": summary["rate"],
                    "ratio": summary["rate"] / bare if bare else None,
                    "mean_batch": summary["mean_batch"] if key != "bare" else None,
                    "peak_rss_mib": summary["peak_rss_mib"],
                }
            )
    return out


def table(data: dict[str, Any]) -> str:
    """The plain-text report: throughput table, then the derived figures."""
    lines = []
    head = (
        f"{'setup':<42} {'broker':<16} {'msg/s':>8} {'vs bare':>8} "
        f"{'batch':>7} {'RSS MiB':>8}"
    )
    lines += [head, "-" * len(head)]
    for row in rows(data):
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        batch = f"{row['mean_batch']:.1f}" if row["mean_batch"] is not None else "-"
        lines.append(
            f"{row['label']:<42} {row['broker']:<16} {row['rate']:>8,.0f} "
            f"{ratio:>8} {batch:>7} {row['peak_rss_mib']:>8.0f}"
        )
    for broker, info in data["brokers"].items():
        if "skipped" in info:
            lines.append(f"{broker}: skipped ({info['skipped']})")
            continue
        setups = info.get("setups", {})
        for key, baseline in RESULTS_BASELINE.items():
            with_results = setups.get(key, {}).get("rate")
            without = setups.get(baseline, {}).get("rate")
            if with_results and without:
                ratio = with_results / without
                verdict = "ok" if ratio >= 0.7 else "below target 0.7"
                lines.append(
                    f"{broker}: per-request results / no results "
                    f"({key.split('-')[1]}) = {ratio:.2f} ({verdict})"
                )
        rss = info.get("rss_scaling")
        if rss:
            verdict = "ok" if rss["ratio"] <= 1.25 else "above target 1.25"
            lines.append(
                f"{broker}: peak RSS with {rss['queued_large']:,} vs "
                f"{rss['queued_small']:,} queued = {rss['large_mib']:.0f} / "
                f"{rss['small_mib']:.0f} MiB = {rss['ratio']:.2f} ({verdict})"
            )
    micro = data.get("microbench")
    if micro:
        lines.append(
            "strategy, per message: ours {ours_strategy_us:.1f} µs vs Celery's "
            "default {celery_strategy_us:.1f} µs (x{strategy_ratio:.2f}); up to "
            "the pool: ours {ours_to_pool_us:.1f} µs vs {celery_to_pool_us:.1f} µs "
            "(x{to_pool_ratio:.2f})".format(**micro)
        )
    if data.get("original"):
        lines.append(f"original 0.11: {data['original']}")
    lines += [f"note: {note}" for note in data.get("notes", ())]
    return "\n".join(lines)


def chart(data: dict[str, Any], path: Path) -> bool:
    """Draw messages/s per setup and broker to ``path``.

    Returns:
        ``False`` if matplotlib is not installed (it is an optional extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    table_rows = rows(data)
    if not table_rows:
        return False
    brokers = [b for b in data["brokers"] if any(r["broker"] == b for r in table_rows)]
    keys = [k for k in data["setups"] if any(r["setup"] == k for r in table_rows)]
    labels = [data["setups"][k]["label"] for k in keys]
    fig, axes = plt.subplots(
        1, len(brokers), figsize=(6.5 * len(brokers), 0.45 * len(keys) + 1.8),
        squeeze=False, sharey=True,
    )  # fmt: skip
    for ax, broker in zip(axes[0], brokers):
        by_key = {r["setup"]: r for r in table_rows if r["broker"] == broker}
        values = [by_key[k]["rate"] if k in by_key else 0 for k in keys]
        colours = [_colour(k) for k in keys]
        positions = list(range(len(keys)))
        ax.barh(positions, values, color=colours)
        for y, key in zip(positions, keys):
            row = by_key.get(key)
            if row is None:
                continue
            text = f" {row['rate']:,.0f}"
            if row["ratio"] is not None and key != "bare":
                text += f"  ({row['ratio']:.2f}x bare)"
            ax.text(row["rate"], y, text, va="center", fontsize=8)
        ax.set_yticks(positions)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_title(f"{broker}: messages/s (median of {data['repeat']})", fontsize=10)
        ax.set_xlim(0, max(values) * 1.45 if any(values) else 1)
        ax.tick_params(axis="x", labelsize=8)
    # The axes share y: inverting one inverts all (twice would undo it).
    axes[0][0].invert_yaxis()
    machine = data["machine"]
    capped = (
        f", runs capped at {data['max_seconds']:g}s" if data.get("max_seconds") else ""
    )
    fig.suptitle(
        f"{data['messages']:,} messages queued per run{capped}, flush_every=100; "
        f"{machine['cores']} cores, celery {machine['celery']}, "
        f"celery-batches {data.get('revision', '?')}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _colour(key: str) -> str:
    if key == "bare":
        return "#9e9e9e"
    if key.startswith("ours") or key.startswith("results"):
        return "#2e7d32"
    if key.startswith("original"):
        return "#ef6c00"
    return "#1565c0"


if __name__ == "__main__":
    # Re-print the table and redraw the chart of a saved run:
    # python benchmarks/report.py [results.json [chart.png]]
    import json
    import sys

    here = Path(__file__).resolve().parent
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else here / "results/latest.json"
    saved = json.loads(source.read_text())
    print(table(saved))
    if len(sys.argv) > 2 and chart(saved, Path(sys.argv[2])):
        print(f"wrote {sys.argv[2]}")
