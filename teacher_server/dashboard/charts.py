"""Charts for the dashboard, drawn on the server by matplotlib as inline SVG: no JavaScript, no CDN, and
the page works offline. Each chart carries `role="img"` and an `aria-label` that says what it shows;
the page puts the numbers in a table beside it for screen readers and copying.
"""

from __future__ import annotations

import io
import re
import threading

_LOCK = threading.Lock()  # pyplot's state is global; one figure at a time
_COLORS = ["#1f5fa8", "#c2541b", "#2e8540", "#7a3e9d", "#8a6d00"]


def _svg(fig, label: str) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    safe = label.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
    return text.replace("<svg", f'<svg role="img" aria-label="{safe}" class="chart"', 1)


def _figure(width: float = 6.4, height: float = 3.0):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "svg.fonttype": "none"})
    fig, ax = plt.subplots(figsize=(width, height))
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3)
    return fig, ax


def bar_chart(labels: list[str], values: list[float], title: str, xlabel: str, ylabel: str) -> str:
    """A bar chart as an SVG string (one bar per label)."""
    with _LOCK:
        fig, ax = _figure()
        ax.bar(range(len(values)), values, color=_COLORS[0])
        ax.set_xticks(range(len(labels)), labels, rotation=0 if len(labels) <= 12 else 60)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        return _svg(fig, f"{title}: bar chart of {ylabel} by {xlabel}")


def histogram_chart(edges: list[float], counts: list[int], title: str, xlabel: str) -> str:
    """A histogram from precomputed bin edges (len n+1) and counts (len n), as an SVG string."""
    with _LOCK:
        fig, ax = _figure()
        widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
        ax.bar(edges[:-1], counts, width=widths, align="edge", color=_COLORS[0], edgecolor="white")
        ax.set(title=title, xlabel=xlabel, ylabel="positions")
        return _svg(fig, f"{title}: histogram of {xlabel}")


def line_chart(series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str, ylabel: str) -> str:
    """Several named (x, y) curves on one axis, as an SVG string."""
    with _LOCK:
        fig, ax = _figure()
        for (name, (x, y)), color in zip(series.items(), _COLORS * 4, strict=False):
            ax.plot(x, y, label=name, color=color, linewidth=1.6)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        if series:
            ax.legend(frameon=False)
        return _svg(fig, f"{title}: {', '.join(series)} against {xlabel}")
