"""Gantt chart of a fused pipeline schedule (matplotlib, Agg backend).

One row per node, a colour per pipeline; forwards light, backwards dark; the
micro-batch index is written in the bars that are wide enough. Works on the
output format of docs/design.md (``result["tasks"]``), so it can draw any saved
result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


def _shade(rgb: tuple[float, float, float], amount: float) -> tuple[float, float, float]:
    """Blend towards white (``amount`` > 0) or black (``amount`` < 0)."""
    if amount >= 0:
        return tuple(c + (1.0 - c) * amount for c in rgb)  # type: ignore[return-value]
    return tuple(c * (1.0 + amount) for c in rgb)  # type: ignore[return-value]


def plot_gantt(result: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Draws ``result["tasks"]`` to ``path`` (format from the suffix, e.g. ``.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    tasks = result["tasks"]
    pipelines = list(dict.fromkeys(t["pipeline"] for t in tasks))
    nodes = max((t["node"] for t in tasks), default=-1) + 1
    palette = matplotlib.colormaps["tab10"]
    base = {p: to_rgb(palette(i % 10)) for i, p in enumerate(pipelines)}
    colour = {(p, k): _shade(base[p], 0.55 if k == "F" else -0.25) for p in pipelines for k in "FB"}
    makespan = max((t["end"] for t in tasks), default=0.0)

    fig, ax = plt.subplots(figsize=(min(40.0, 4.0 + 0.08 * len(tasks) / max(1, nodes)), 0.9 + 0.42 * nodes))
    label_width = makespan / 60.0
    for t in tasks:
        width = t["end"] - t["start"]
        ax.broken_barh([(t["start"], width)], (t["node"] - 0.4, 0.8),
                       facecolors=colour[(t["pipeline"], t["kind"])], edgecolor="white", linewidth=0.4)
        if width >= label_width:
            ax.text(t["start"] + width / 2, t["node"], str(t["microbatch"]), ha="center", va="center",
                    fontsize=6, color="black" if t["kind"] == "F" else "white")
    ax.set_ylim(nodes - 0.5, -0.5)
    ax.set_yticks(range(nodes))
    ax.set_yticklabels([f"node {n}" for n in range(nodes)])
    ax.set_xlim(0, makespan)
    ax.set_xlabel("time")
    if title is None:
        title = (f"makespan {result.get('makespan', makespan):g}, lower bound {result.get('lower_bound', 0):g}, "
                 f"bubble {100 * result.get('bubble_ratio', 0):.1f}%, peak memory {result.get('peak_memory', 0):g}")
    ax.set_title(title, fontsize=9)
    handles = [Patch(facecolor=colour[(p, k)], label=f"{p} {'forward' if k == 'F' else 'backward'}")
               for p in pipelines for k in "FB"]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
