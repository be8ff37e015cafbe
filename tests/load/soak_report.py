"""The verdict, summary and plot of `make soak` (used by soak.py; not a pytest module).

Growth is judged on the samples after warm-up: the median of the first fifth
of them (at least 3 samples) is the baseline, the median of the last fifth the
end value, and a metric fails when the end exceeds the baseline by more than
10 % *and* by more than an absolute floor (a handful of descriptors or
connections that happen to be open at one sampling instant are noise, not a
leak). Medians of windows, not single samples, so that one busy instant (a
burst of downloads in flight) neither fails a run nor hides a trend.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GROWTH_LIMIT = 0.10
# metric key -> (label, unit, absolute floor)
GROWTH_METRICS: dict[str, tuple[str, str, float]] = {
    "rss_mib": ("RSS", "MiB", 2.0),
    "fds": ("open file descriptors", "", 10.0),
    "upstream_conns": ("established upstream connections", "", 10.0),
}
MIN_POST_WARMUP_SAMPLES = 6


@dataclass(frozen=True)
class Growth:
    metric: str
    baseline: float  # median of the first post-warm-up window
    end: float  # median of the last window
    allowed: float  # the end value above which the run fails
    window: int  # samples per window
    ok: bool

    @property
    def change(self) -> float:
        return (self.end - self.baseline) / self.baseline if self.baseline else 0.0


def post_warmup(samples: list[dict[str, Any]], warmup: float) -> list[dict[str, Any]]:
    return [s for s in samples if s["t"] >= warmup]


def growth(
    samples: list[dict[str, Any]], warmup: float, metric: str, floor: float
) -> Growth | None:
    """The growth verdict for one metric; None when too few samples follow warm-up."""
    values = [float(s[metric]) for s in post_warmup(samples, warmup)]
    if len(values) < MIN_POST_WARMUP_SAMPLES:
        return None
    window = max(3, len(values) // 5)
    baseline = statistics.median(values[:window])
    end = statistics.median(values[-window:])
    allowed = baseline + max(GROWTH_LIMIT * baseline, floor)
    return Growth(metric, baseline, end, allowed, window, end <= allowed)


def growth_verdicts(samples: list[dict[str, Any]], warmup: float) -> tuple[list[Growth], list[str]]:
    """Every metric's verdict, and the failures as sentences."""
    verdicts, failures = [], []
    for metric, (label, unit, floor) in GROWTH_METRICS.items():
        verdict = growth(samples, warmup, metric, floor)
        if verdict is None:
            failures.append(
                f"{label}: fewer than {MIN_POST_WARMUP_SAMPLES} samples after warm-up "
                "(run longer or sample more often)"
            )
            continue
        verdicts.append(verdict)
        if not verdict.ok:
            failures.append(
                f"{label} grew from {verdict.baseline:g}{unit} to {verdict.end:g}{unit} "
                f"({verdict.change:+.0%}; allowed up to {verdict.allowed:g}{unit})"
            )
    return verdicts, failures


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- writing ------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def render_markdown(summary: dict[str, Any]) -> str:
    run = summary["run"]
    lines = [
        f"# make soak: {'PASS' if summary['ok'] else 'FAIL'}",
        "",
        f"{run['duration_s']:g} s of mixed traffic, {run['users']} users, sampled every "
        f"{run['interval_s']:g} s; warm-up {run['warmup_s']:g} s; access tokens live "
        f"{run['access_ttl_s']:g} s; header_timeout {run['header_timeout_s']:g} s, "
        f"body_timeout {run['body_timeout_s']:g} s.",
        "",
        "| measure | baseline | end | change | allowed up to | verdict |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for g in summary["growth"]:
        label, unit, _ = GROWTH_METRICS[g["metric"]]
        lines.append(
            f"| {label} ({unit or 'count'}) | {g['baseline']:g} | {g['end']:g} | "
            f"{g['change']:+.1%} | {g['allowed']:g} | {'ok' if g['ok'] else 'FAIL'} |"
        )
    traffic = summary["traffic"]
    lines += [
        "",
        "| traffic | value |",
        "|---|---:|",
        f"| requests answered | {traffic['requests']:,} ({traffic['requests_per_s']:.0f}/s) |",
        f"| API call latency p50 / p99 (ms) | {_fmt(traffic['api_p50_ms'])} / "
        f"{_fmt(traffic['api_p99_ms'])} (worst {run['interval_s']:g} s interval: "
        f"{_fmt(traffic['api_worst_interval_p99_ms'])}) |",
        f"| logins / refresh calls at the token endpoint | {traffic['logins']:,} / "
        f"{traffic['refresh_calls']:,} |",
        f"| refresh tokens presented twice (families revoked) | {traffic['revoked_families']} |",
        f"| gateway's own 5xx | {sum(summary['gateway_5xx'].values())} |",
        f"| unexpected answers | {sum(summary['unexpected'].values())} |",
    ]
    for what, count in sorted(summary["outcomes"].items()):
        lines.append(f"| {what} | {count:,} |")
    if summary["failures"]:
        lines += ["", "Failures:", ""] + [f"- {failure}" for failure in summary["failures"]]
    examples = summary.get("examples") or {}
    for kind, texts in examples.items():
        lines += ["", f"First {kind} examples:", ""] + [f"- {text}" for text in texts]
    return "\n".join(lines) + "\n"


def write_summary(summary: dict[str, Any], json_path: Path, md_path: Path) -> str:
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    text = render_markdown(summary)
    md_path.write_text(text)
    return text


def growth_dicts(verdicts: list[Growth]) -> list[dict[str, Any]]:
    return [{**asdict(v), "change": v.change} for v in verdicts]


def plot(samples: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Four panels over time: RSS, descriptors, connections, request rate and latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s["t"] / 60 for s in samples]
    warmup = summary["run"]["warmup_s"] / 60
    verdicts = {g["metric"]: g for g in summary["growth"]}
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
    panels = [
        (axes[0][0], "rss_mib", "gateway RSS (MiB)"),
        (axes[0][1], "fds", "open file descriptors"),
        (axes[1][0], "upstream_conns", "connections"),
    ]
    for ax, key, title in panels:
        ax.plot(minutes, [s[key] for s in samples], marker=".", label=key.replace("_", " "))
        verdict = verdicts.get(key)
        if verdict is not None:
            ax.axhline(verdict["baseline"], color="grey", lw=0.8, ls="--", label="baseline")
            ax.axhline(verdict["allowed"], color="red", lw=0.8, ls=":", label="fail above")
        ax.set_title(title, fontsize=10)
    ax_conn = axes[1][0]
    ax_conn.plot(
        minutes, [s["client_conns"] for s in samples], marker=".", label="client connections"
    )
    for ax, key, _ in panels:
        # Room above the fail line (axhline does not widen the limits by itself).
        tops = [s[key] for s in samples] + [verdicts.get(key, {}).get("allowed", 0)]
        if key == "upstream_conns":
            tops += [s["client_conns"] for s in samples]
        ax.set_ylim(0, max(tops) * 1.15 + 1)
    ax_conn.legend(fontsize=7, loc="center right")
    axes[0][0].legend(fontsize=7, loc="lower right")
    ax_rate = axes[1][1]
    ax_rate.plot(minutes, [s["rps"] for s in samples], marker=".", color="tab:green")
    ax_rate.set_ylabel("requests/s", color="tab:green", fontsize=9)
    ax_rate.set_ylim(bottom=0)
    ax_rate.set_title("requests/s and API p99 latency", fontsize=10)
    ax_lat = ax_rate.twinx()
    ax_lat.plot(
        minutes,
        [s["p99_ms"] if s["p99_ms"] is not None else float("nan") for s in samples],
        marker=".",
        color="tab:purple",
    )
    ax_lat.set_ylabel("p99 ms", color="tab:purple", fontsize=9)
    ax_lat.set_ylim(bottom=0)
    for row in axes:
        for ax in row:
            ax.axvspan(0, warmup, color="grey", alpha=0.12, lw=0)
            ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("minutes (grey: warm-up)")
    run = summary["run"]
    fig.suptitle(
        f"make soak: {run['duration_s']:g} s, {run['users']} users, "
        f"{summary['traffic']['requests']:,} requests — {'PASS' if summary['ok'] else 'FAIL'}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
