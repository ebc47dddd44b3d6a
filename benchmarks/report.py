"""The benchmark's table and chart, from the results dictionary."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness import Measurement
    from run import Setup

__all__ = ["chart", "latency_chart", "progress", "rows", "table", "targets"]

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
                    "mean_batch": (
                        summary["mean_batch"] if not key.startswith("bare") else None
                    ),
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
    lines += _publishing_lines(data)
    lines += _latency_lines(data)
    lines += ["", "targets (ratios within this run):"]
    lines += [f"  {'ok  ' if ok else 'MISS'} {text}" for text, ok in targets(data)] or [
        "  (not measured)"
    ]
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


def _rate(data: dict[str, Any], broker: str, key: str) -> float | None:
    rate = data["brokers"].get(broker, {}).get("setups", {}).get(key, {}).get("rate")
    return float(rate) if rate else None


def _publish_rate(data: dict[str, Any], broker: str, way: str) -> float | None:
    rate = data.get("publishing", {}).get(broker, {}).get(way, {}).get("rate")
    return float(rate) if rate else None


def targets(data: dict[str, Any]) -> list[tuple[str, bool]]:
    """Each target of issue 12 that this run measured: its figures, and met or not."""
    out: list[tuple[str, bool]] = []

    def ratio(
        text: str, top: float | None, bottom: float | None, at_least: float
    ) -> None:
        if top and bottom:
            value = top / bottom
            out.append(
                (f"{text} = {value:.2f} (target {at_least:g})", value >= at_least)
            )

    ratio(
        "redis: ours, solo / original 0.11, prefetch 0, solo",
        _rate(data, "redis", "ours-solo"),
        _rate(data, "redis", "original-solo"),
        5.0,
    )
    top, bare = _rate(data, "redis", "ours-solo"), _rate(data, "redis", "bare-noack")
    if top and bare:
        out.append(
            (
                f"redis: ours, solo / bare consumer without acks = {top / bare:.2f} "
                "(target above 1)",
                top > bare,
            )
        )
    ratio(
        "redis: delay_many / delay() loop",
        _publish_rate(data, "redis", "delay_many"),
        _publish_rate(data, "redis", "delay"),
        8.0,
    )
    ratio(
        "rabbitmq: delay_many / delay() loop",
        _publish_rate(data, "rabbitmq", "delay_many"),
        _publish_rate(data, "rabbitmq", "delay"),
        2.0,
    )
    ratio(
        "rabbitmq: ours, solo / bare consumer without acks",
        _rate(data, "rabbitmq", "ours-solo"),
        _rate(data, "rabbitmq", "bare-noack"),
        0.75,
    )
    capacity = _rate(data, "redis", "results-solo")
    for key, entry in data.get("latency", {}).items():
        if key != "ours-solo":
            continue
        for row in entry["rows"]:
            if "p99" in row:
                load = (
                    f"; offered load {row['rate'] / capacity:.0%} of what this "
                    f"worker drains, {capacity:,.0f} calls/s"
                    if capacity
                    else ""
                )
                out.append(
                    (
                        f"latency, {entry['label']}, {row['rate']:,}/s: p99 "
                        f"{row['p99'] * 1000:.0f} ms (target at most "
                        f"{row['bound'] * 1000:.0f} ms{load})",
                        row["p99"] <= row["bound"] and not row.get("lost"),
                    )
                )
    return out


def _publishing_lines(data: dict[str, Any]) -> list[str]:
    published = data.get("publishing")
    if not published:
        return []
    lines = ["", f"{'publishing':<42} {'broker':<16} {'calls/s':>8} {'x delay':>8}"]
    for broker, ways in published.items():
        base = ways.get("delay", {}).get("rate")
        for way in ways.values():
            if not way.get("rate"):
                lines.append(f"{way['label']:<42} {broker:<16} FAILED {way['error']}")
                continue
            times = f"{way['rate'] / base:.2f}" if base else "-"
            lines.append(
                f"{way['label']:<42} {broker:<16} {way['rate']:>8,.0f} {times:>8}"
            )
    return lines


def _latency_lines(data: dict[str, Any]) -> list[str]:
    measured = data.get("latency")
    if not measured:
        return []
    lines = [
        "",
        "latency, publish to stored result, redis (flush_every=100, flush_interval=1)",
        f"{'setup':<42} {'calls/s':>8} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
        f"{'bound ms':>8}",
    ]
    capacity = _rate(data, "redis", "results-solo")
    if capacity:
        # A load the worker cannot drain queues up, batching or not.
        lines.insert(
            2,
            f"(the solo worker with results drained {capacity:,.0f} calls/s "
            "in this run: a load near that measures its queue, not batching)",
        )
    for entry in measured.values():
        for row in entry["rows"]:
            if "p99" not in row:
                lines.append(
                    f"{entry['label']:<42} {row['rate']:>8,} FAILED {row['error']}"
                )
                continue
            lines.append(
                f"{entry['label']:<42} {row['rate']:>8,} {row['p50'] * 1000:>7.0f} "
                f"{row['p95'] * 1000:>7.0f} {row['p99'] * 1000:>7.0f} "
                f"{row['bound'] * 1000:>8.0f}"
                + (
                    f"  ({row['lost']} not back within the wait)"
                    if row.get("lost")
                    else ""
                )
            )
    return lines


def latency_chart(data: dict[str, Any], path: Path) -> bool:
    """Draw p50/p95/p99 per offered load and setup, with each bound, to ``path``.

    Returns:
        ``False`` if matplotlib is not installed, or nothing was measured.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    measured = data.get("latency") or {}
    entries = [e for e in measured.values() if any("p99" in r for r in e["rows"])]
    if not entries:
        return False
    fig, axes = plt.subplots(
        1, len(entries), figsize=(5.5 * len(entries), 3.6), squeeze=False, sharey=True
    )
    for ax, entry in zip(axes[0], entries):
        rows = [r for r in entry["rows"] if "p99" in r]
        positions = list(range(len(rows)))
        width = 0.25
        for offset, (name, colour) in enumerate(
            [("p50", "#a5d6a7"), ("p95", "#4caf50"), ("p99", "#1b5e20")]
        ):
            values = [r[name] * 1000 for r in rows]
            ax.bar([p + (offset - 1) * width for p in positions], values, width,
                   label=name, color=colour)  # fmt: skip
        for position, row in zip(positions, rows):
            ax.hlines(row["bound"] * 1000, position - 0.45, position + 0.45,
                      colors="#c62828", linestyles="dashed")  # fmt: skip
        ax.set_xticks(positions)
        ax.set_xticklabels([f"{r['rate']:,}/s" for r in rows], fontsize=8)
        ax.set_yscale("log")
        ax.set_title(entry["label"], fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        ax.legend(fontsize=8, loc="upper right")
    axes[0][0].set_ylabel("ms, publish to stored result (log)", fontsize=8)
    fig.suptitle(
        "Redis, solo, flush_every=100, flush_interval=1; dashed: "
        "min(flush_interval, flush_every/rate) + 50 ms",
        fontsize=9,
    )
    _save(plt, fig, path)
    return True


def _save(plt: Any, fig: Any, path: Path) -> None:
    """Write ``fig`` to ``path`` as every chart of the report is written."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    _save(plt, fig, path)
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
