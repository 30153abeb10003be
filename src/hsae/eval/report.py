"""Reports: `report.json` (every number) and a self-contained `report.html` (tables and inline SVG).

A report is a list of sections; each holds metrics or says why it was skipped — a skipped metric is
never a silent zero. Every number comes from the metric functions in hsae.eval.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsae.atomic import write_json, write_text


@dataclass
class Section:
    name: str
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None  # why this section could not be computed
    seconds: float | None = None  # how long the section took

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"skipped": self.skipped} if self.skipped else dict(self.metrics)
        if self.seconds is not None:
            out["seconds"] = round(self.seconds, 3)
        return out


@dataclass
class Report:
    title: str
    info: dict[str, Any] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (caption, svg)

    def add(
        self, name: str, metrics: dict[str, Any] | None = None, skipped: str | None = None, seconds: float | None = None
    ) -> Section:
        section = Section(name, metrics or {}, skipped, seconds)
        self.sections.append(section)
        return section

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "info": self.info, "sections": {s.name: s.to_json() for s in self.sections}}

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        out_dir = Path(out_dir)
        write_json(out_dir / "report.json", _finite(self.to_json()))
        write_text(out_dir / "report.html", render_html(self))
        return out_dir / "report.json", out_dir / "report.html"


def _finite(obj: Any) -> Any:
    """JSON has no NaN: write null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return f"[{len(value)} values]"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {format_value(v)}" for k, v in value.items())
    return str(value)


def scalar_items(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    """The metrics worth a table row (lists such as histograms go to figures and the JSON)."""
    return [(k, v) for k, v in metrics.items() if not isinstance(v, (list, tuple))]


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1000px; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 1.6rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5rem 0; } td, th { padding: .2rem .8rem; text-align: left; }
tr:nth-child(even) { background: #f5f5f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.skipped { color: #a33; } figure { display: inline-block; margin: .5rem; } figcaption { color: #555; }
svg { max-width: 100%; height: auto; }
"""


def render_html(report: Report) -> str:
    esc = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(report.title)}</title>",
        f"<style>{_STYLE}</style></head><body><h1>{esc(report.title)}</h1>",
    ]
    if report.info:
        parts.append("<table>")
        for key, value in report.info.items():
            parts.append(f"<tr><th>{esc(str(key))}</th><td>{esc(format_value(value))}</td></tr>")
        parts.append("</table>")
    for section in report.sections:
        parts.append(f"<h2>{esc(section.name)}</h2>")
        if section.skipped:
            parts.append(f"<p class='skipped'>skipped: {esc(section.skipped)}</p>")
            continue
        parts.append("<table>")
        for key, value in scalar_items(section.metrics):
            parts.append(f"<tr><th>{esc(key)}</th><td class='num'>{esc(format_value(value))}</td></tr>")
        parts.append("</table>")
    if report.figures:
        parts.append("<h2>figures</h2>")
        for caption, svg in report.figures:
            parts.append(f"<figure>{svg}<figcaption>{esc(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
