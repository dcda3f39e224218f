"""MkDocs hook: the benchmark charts, drawn at build time from ``bench/results/*.json``.

The pages show what the results files say, so a new benchmark run changes the charts with no edit to
the docs. Plain SVG from plain Python: no plotting library to install, and the files diff as text.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"

# cachemw's bars, its peers', and the references (no cache, the raw ceiling).
_COLOURS = {"cachemw": "#3f51b5", "peer": "#ef6c00", "reference": "#9e9e9e"}


@dataclass(frozen=True, slots=True)
class Bar:
    label: str
    value: float
    kind: str  # a key of _COLOURS
    note: str = ""  # printed after the value


def _bars_svg(title: str, unit: str, bars: Sequence[Bar], *, log: bool = False,
              marker: tuple[float, str] | None = None) -> str:
    """A horizontal bar chart; ``marker`` draws a vertical line (a bound) at a value, with its label."""
    label_w, plot_w, row_h, top = 330, 360, 22, 34
    width, height = label_w + plot_w + 150, top + row_h * len(bars) + 30
    high = max([b.value for b in bars] + [marker[0] if marker else 0.0]) or 1.0
    low = 1.0

    def x(value: float) -> float:
        if log:
            span = math.log10(high * 1.2) - math.log10(low)
            return label_w + plot_w * max(0.0, math.log10(max(value, low)) - math.log10(low)) / span
        return label_w + plot_w * value / (high * 1.05)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<text x="4" y="18" font-size="14" font-weight="bold">{escape(title)}</text>']
    for i, bar in enumerate(bars):
        y = top + i * row_h
        out.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{escape(bar.label)}</text>')
        end = x(bar.value)
        out.append(f'<rect x="{label_w}" y="{y + 3}" width="{max(end - label_w, 1):.1f}" height="{row_h - 6}" '
                   f'fill="{_COLOURS[bar.kind]}"/>')
        text = f"{bar.value:,.0f}" if bar.value >= 100 else f"{bar.value:.2f}"
        out.append(f'<text x="{end + 4:.1f}" y="{y + 14}">{text} {escape(unit)}{escape(bar.note)}</text>')
    if marker:
        mx = x(marker[0])
        out.append(f'<line x1="{mx:.1f}" y1="{top - 4}" x2="{mx:.1f}" y2="{height - 22}" stroke="#c62828" '
                   'stroke-dasharray="4 3"/>')
        out.append(f'<text x="{mx:.1f}" y="{height - 8}" text-anchor="middle" fill="#c62828">'
                   f'{escape(marker[1])}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _load(name: str) -> Any:
    return json.loads((RESULTS / name).read_text())


def _kind(label: str) -> str:
    lowered = label.lower()
    if "fastapi-cache2" in lowered or "cashews" in lowered:
        return "peer"
    if "without the middleware" in lowered:
        return "reference"
    return "cachemw" if "cachemw" in lowered else "reference"


def _peers(metric: str, unit: str, title: str) -> str:
    """Median over the rounds of one metric of every case of ``bench/peers.py``."""
    data = _load("peers.json")
    bars = [Bar(case["label"].replace("*", "").replace("`", "").split(" (**")[0][:52],
                statistics.median(case[metric]), _kind(case["label"])) for case in data["cases"]]
    return _bars_svg(f"{title} ({data['facts']['date'][:10]}, median of {len(data['cases'][0][metric])} rounds)",
                     unit, bars)


def _staleness() -> str:
    """Per phase and round: the longest a server answered from a purged copy, against the ``sync`` bound."""
    data = _load("staleness.json")
    sync_ms = data["args"]["sync"] * 1000
    bars = [Bar(f"{phase}, round {i}", run["max_ms"], "cachemw",
                f" (p50 {run['p50_ms']:g}, p99 {run['p99_ms']:g}; {run['answers_past_sync']} past sync)")
            for phase, runs in data["results"].items() for i, run in enumerate(runs, 1)]
    return _bars_svg(f"Staleness after a purge: max ms per run, {data['args']['purges']:,} purges each "
                     f"({data['facts']['date'][:10]}; log scale)", "ms", bars, log=True,
                     marker=(sync_ms, f"sync = {sync_ms:g} ms"))


def _overload() -> str:
    """Origin calls per cold key, fleet-wide, per library, phase and round of ``bench/overload.py``."""
    data = _load("overload.json")
    runs = sorted(data["runs"], key=lambda r: (r["library"] != "cachemw", r["library"], r["phase"], r["round"]))
    bars = [Bar(f"{r['library']}, {r['phase']}, round {r['round']}", r["cold_ratio"],
                "cachemw" if r["library"] == "cachemw" else "peer", f" ({r['ok_share']:.0%} 2xx)") for r in runs]
    return _bars_svg(f"Origin calls per cold key under overload ({data['facts']['date'][:10]}; 1.00 is the goal)",
                     "calls", bars, marker=(1.0, "1 call per key"))


CHARTS = {
    "img/charts/peers-rps.svg": lambda: _peers("rps", "req/s", "Requests per second"),
    "img/charts/peers-p99.svg": lambda: _peers("p99", "ms", "p99 latency"),
    "img/charts/staleness.svg": _staleness,
    "img/charts/overload-origin-calls.svg": _overload,
}


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for path, draw in CHARTS.items():
        files.append(File.generated(config, path, content=draw()))
    return files
