"""Figures as inline SVG strings (matplotlib, no display), for self-contained HTML reports."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def to_svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog so it can sit inside HTML


def density_histogram(density: Sequence[float], title: str = "Feature density") -> str:
    d = np.asarray(density, dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    alive = d[d > 0]
    if alive.size:
        ax.hist(np.log10(alive), bins=40, color="#3b6ea8")
    ax.set_xlabel(f"log10 firing frequency (dead latents not shown: {int((d == 0).sum())})")
    ax.set_ylabel("latents")
    ax.set_title(title)
    return to_svg(fig)


def l0_histogram(counts: Sequence[int], title: str = "Active latents per token (L0)") -> str:
    c = np.asarray(counts, dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.bar(np.arange(c.size), c, width=1.0, color="#a8553b")
    ax.set_xlabel("L0")
    ax.set_ylabel("tokens")
    ax.set_title(title)
    return to_svg(fig)


def forest_shape(depth_counts: Sequence[int], branching: Sequence[int], title: str = "Forest shape") -> str:
    """Latents per depth, and the distribution of children per parent."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    a.bar(np.arange(len(depth_counts)), depth_counts, color="#4f8a4f")
    a.set_xlabel("depth (0 = root)")
    a.set_ylabel("latents")
    br = np.asarray(branching, dtype=int)
    if br.size:
        b.hist(br, bins=np.arange(br.max() + 2) - 0.5, color="#7a4f8a")
    b.set_xlabel("children per parent")
    b.set_ylabel("parents")
    fig.suptitle(title)
    return to_svg(fig)


def frontier(points: Sequence[tuple[str, float, float]], title: str = "FVU against L0") -> str:
    """(label, l0, fvu) per model."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, l0, f in points:
        ax.scatter([l0], [f], s=30)
        ax.annotate(label, (l0, f), textcoords="offset points", xytext=(4, 4), fontsize=8)
    pts = sorted((l0, f) for _, l0, f in points)
    best, front = float("inf"), []
    for l0, f in pts:  # the Pareto frontier: lowest FVU reached at or below each L0
        if f < best:
            best = f
            front.append((l0, f))
    if len(front) > 1:
        ax.plot(*zip(*front, strict=False), color="#888", linestyle="--", linewidth=1)
    ax.set_xlabel("L0")
    ax.set_ylabel("FVU")
    ax.set_title(title)
    return to_svg(fig)
