"""Predicted iteration timeline of a plan: devices x time, one colour per call."""

from __future__ import annotations

from pathlib import Path

from .plan_eval import PlanEstimate

COLOURS = {"actor_gen": "#4C72B0", "inference": "#8172B2", "ref": "#64B5CD",
           "reward": "#CCB974", "critic_infer": "#DD8452", "actor_train": "#55A868",
           "critic_train": "#C44E52", "train (fused)": "#2E8B57",
           "actor_train+critic_train": "#6E8B3D", "realloc:actor": "#999999",
           "realloc:critic": "#BBBBBB", "load": "#DDDDDD", "migrate": "#E41A1C"}


def plot_timeline(estimate: PlanEstimate, path: str | Path, title: str | None = None) -> Path:
    """Draw ``estimate.events`` as bars per device (matplotlib Agg); reallocations
    hatched, tail migrations red with a cross hatch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = estimate.plan.num_devices
    fig, ax = plt.subplots(figsize=(12, max(3.0, min(24.0, 0.25 * n + 1.5))))
    seen: dict[str, str] = {}
    for e in estimate.events:
        colour = COLOURS.get(e.label, "#777777")
        hatch = "//" if e.label.startswith("realloc") else ("xx" if e.label == "migrate" else None)
        for d in e.devices:
            ax.barh(d, e.end - e.start, left=e.start, height=0.8, color=colour, hatch=hatch,
                    edgecolor="black" if hatch else colour, linewidth=0.3)
        seen[e.label] = colour
    ax.set_xlabel("time (s)")
    ax.set_ylabel("device")
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, estimate.iteration_s * 1.01)
    handles = [Patch(facecolor=c, label=lbl,
                     hatch="//" if lbl.startswith("realloc") else ("xx" if lbl == "migrate"
                                                                    else None))
               for lbl, c in seen.items()]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=5,
              fontsize=8, frameon=False)
    ax.set_title(title or f"predicted iteration: {estimate.iteration_s:.2f} s")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
