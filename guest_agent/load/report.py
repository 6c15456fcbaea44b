"""The end-of-run report: a wrk/vegeta-style text summary, stable JSON, and a plot."""

from __future__ import annotations

from .worker import LoadResult

#: JSON keys promised by issue 6 (and a few more); never renamed once published.
JSON_KEYS = ("batches_per_s", "ranges_per_s", "pages_per_s", "wire_bytes_per_s", "latency_s", "errors",
             "window_stall_s", "guests", "duration_s", "offered_rate", "achieved_rate", "batches",
             "reconnects")


def version() -> str:
    try:
        from importlib.metadata import version as package_version

        return package_version("balloon-hints")
    except Exception:  # noqa: BLE001 - running from a source tree that is not installed
        return "unknown"


def timeline_rows(result: LoadResult) -> list[dict]:
    """Per-second rows, each saying how much of its second the run covered (``seconds``).

    The last second is usually partial (a 10.3 s run has 0.3 s in second 10): its count
    is a fraction of a full second's, so ``batches_per_s`` divides by what was covered
    instead of showing a fake drop; a plot leaves out slivers under 0.25 s.
    """
    rows = []
    for row in result.timeline.rows():
        covered = round(min(1.0, max(0.0, result.elapsed_s - row["t"])), 6)
        rows.append({**row, "seconds": covered,
                     "batches_per_s": row["batches"] / covered if covered > 0 else None})
    return rows


def summary(result: LoadResult) -> dict:
    """The run as a JSON-ready dict. Rates are per second over the whole run, all guests."""
    import datetime

    config, totals = result.config, result.totals
    elapsed = max(result.elapsed_s, 1e-9)
    offered = None if config.rate is None else config.rate * config.guests
    return {
        "batches_per_s": totals.batches / elapsed,
        "ranges_per_s": totals.ranges / elapsed,
        "pages_per_s": totals.pages / elapsed,
        "wire_bytes_per_s": totals.wire_bytes / elapsed,
        "latency_s": result.latency_s,
        "errors": dict(sorted(totals.errors.items())),
        "window_stall_s": totals.window_stall_s,
        "guests": config.guests,
        "duration_s": result.elapsed_s,
        "offered_rate": offered,
        "achieved_rate": totals.batches / elapsed,
        "batches": totals.batches,
        "reconnects": totals.reconnects,
        # context, so a JSON file says what it measured
        "sent": totals.sent,
        "ranges": totals.ranges,
        "pages": totals.pages,
        "wire_bytes": totals.wire_bytes,
        "rejected_pages": totals.rejected_pages,
        "sessions": totals.sessions,
        "processes": config.processes,
        "connect": config.connect,
        "kind": config.kind,
        "reuse": config.reuse,
        "encoding": config.encoding,
        "batch_ranges": config.batch_ranges,
        "fragmentation": config.fragmentation,
        "guest_pages": config.guest_pages,
        "mode": "closed" if config.rate is None else "open",
        "connect_errors": result.last_errors,
        "timeline": timeline_rows(result),
        "latency_distribution": result.latency_distribution,
        # when and with what this was measured, so a JSON file stands on its own
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "version": version(),
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.3f}"


def _si(value: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{suffix}"
    return f"{value:.1f}"


def render_text(data: dict) -> str:
    """Plain text, like wrk's and vegeta's summaries."""
    latency = data["latency_s"]
    mode = ("closed loop (window-bound)" if data["offered_rate"] is None
            else f"open loop, {data['offered_rate']:.1f} batches/s offered")
    kind = data["kind"] + (" + reuse" if data["reuse"] else "")
    errors = ", ".join(f"{code}={count}" for code, count in data["errors"].items()) or "none"
    lines = [
        f"balloon-load: {data['guests']} guest(s) in {data['processes']} process(es) -> {data['connect']}",
        f"  {kind} batches of {data['batch_ranges']} {'PFNs' if data['encoding'] == 'pfn32' else 'ranges'}"
        f" ({data['encoding']}), fragmentation {data['fragmentation']:g}, {mode}",
        f"  Duration      {data['duration_s']:.2f} s",
        f"  Offered       {'closed loop' if data['offered_rate'] is None else _si(data['offered_rate']) + ' batches/s'}",
        f"  Achieved      {_si(data['achieved_rate'])} batches/s  ({data['batches']} acked of {data['sent']} sent)",
        f"  Throughput    {_si(data['ranges_per_s'])} ranges/s  {_si(data['pages_per_s'])} pages/s"
        f"  {data['wire_bytes_per_s'] / 1e6:.2f} MB/s on the wire",
        f"  Ack latency   (ms)  mean {_ms(latency['mean'])}  stdev {_ms(latency['stdev'])}  "
        f"min {_ms(latency['min'])}  max {_ms(latency['max'])}",
        f"                    p50 {_ms(latency['p50'])}  p90 {_ms(latency['p90'])}  p99 {_ms(latency['p99'])}"
        f"  p99.9 {_ms(latency['p999'])}",
        f"  Errors        {errors}",
        f"  Rejected      {data['rejected_pages']} pages",
        f"  Window stall  {data['window_stall_s']:.2f} guest-seconds",
        f"  Reconnects    {data['reconnects']}",
    ]
    for error in data["connect_errors"][:3]:
        lines.append(f"  last connect error: {error}")
    if data.get("latency_distribution"):
        lines.append("  Ack latency distribution (HdrHistogram):")
        lines.append(f"    {'value ms':>12}  {'percentile':>12}  {'total count':>12}  {'1/(1-p)':>10}")
        for row in data["latency_distribution"]:
            p = row["percentile"] / 100
            inverse = "inf" if p >= 1 else f"{1 / (1 - p):.2f}"
            lines.append(f"    {row['value_s'] * 1e3:12.3f}  {p:12.6f}  {row['count']:12,}  {inverse:>10}")
    lines.append(f"  balloon-hints {data.get('version', '?')}, {data.get('timestamp', '')}")
    return "\n".join(lines)


def plot(data: dict, path: str) -> None:
    """Throughput and latency per second (matplotlib, Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a sliver of a last second would plot as a fake drop in throughput: leave it out
    rows = [row for row in data["timeline"] if row.get("seconds", 1.0) >= 0.25]
    seconds = [row["t"] for row in rows]
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    top.plot(seconds, [row.get("batches_per_s", row["batches"]) for row in rows], marker=".",
             label="acked batches/s")
    top.set_ylabel("batches/s")
    top.set_title(f"balloon-load: {data['guests']} guests, {data['kind']}, {data['batch_ranges']} ranges/batch")
    top.grid(True, alpha=0.3)
    for key, label in (("p50_s", "p50"), ("p99_s", "p99"), ("max_s", "max")):
        values = [None if row[key] is None else row[key] * 1e3 for row in rows]
        bottom.plot(seconds, values, marker=".", label=label)
    bottom.set_ylabel("ack latency (ms)")
    bottom.set_xlabel("seconds since start")
    bottom.set_yscale("log")
    bottom.legend()
    bottom.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
