"""Collect ``bench/results/<scenario>.json`` into ``latest.json``, a Markdown report
(``latest.md``) and a PNG of the ratios (``ratios.png``), with *measured* figures kept
apart from *predicted/simulated* ones everywhere.

    python bench/report.py [--results bench/results] [--device cpu|gpu]

Every scalar figure is put in one of four kinds (:func:`kind`):

- ``measured``: timed on this machine in one run (ratios: both sides alternated);
- ``predicted``: from a model -- the iteration simulator, the pipeline scheduler's cost
  model, the plan evaluator -- never from a run: whole scenarios (``sim``, ``plan``,
  ``schedule``) and the keys that say so (``predicted``, ``simulated``, ``sim``, a lower
  ``bound``, the inter-stage policy's simulated ``sweep`` and ``rt``);
- ``predicted_vs_measured``: how far a prediction is from the measurement it predicts
  (keys naming both, or an ``error``);
- ``published``: figures a paper reports (``rlhfuse_reported``).

``latest.json`` holds the raw results and, per scenario, the figures by kind;
``latest.md`` one section per kind; ``ratios.png`` one panel per kind, labelled.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from pathlib import Path

SCENARIOS = ("e2e", "sim_check", "gen", "realloc", "interstage", "schedule", "fused_train",
             "scaling", "plan", "sim", "peer", "vllm_sync")
# Scenarios whose every figure comes from a model, not a run.
SIMULATED_SCENARIOS = {"sim", "plan", "schedule"}
# Words of a key that mark a figure as a model's output.
PREDICTED_WORDS = {"predicted", "prediction", "simulated", "simulator", "sim", "bound", "sweep",
                   "rt"}
KINDS = ("measured", "predicted", "predicted_vs_measured", "published")
TITLES = {
    "measured": "measured (timed on this machine in one run)",
    "predicted": "predicted / simulated (a model's output, not a measurement)",
    "predicted_vs_measured": "predicted vs measured (accuracy of a prediction; 1 = exact)",
    "published": "published (reported by a paper, for reference)",
}
# Words naming a ratio (fused vs baseline, ours vs peer, achieved vs limit).
RATIO_WORDS = {"speedup", "speedups", "ratio", "ratios", "fraction", "frac"}


def words(key: str) -> list[str]:
    return [w for w in re.split(r"[/_]", key.lower()) if w]


def kind(scenario: str, key: str) -> str:
    """The kind of figure ``key`` of ``scenario`` (module docstring)."""
    ws = set(words(key))
    if "reported" in ws:
        return "published"
    predicted = scenario in SIMULATED_SCENARIOS or bool(ws & PREDICTED_WORDS)
    if (predicted and "measured" in ws) or "error" in ws:
        return "predicted_vs_measured"
    return "predicted" if predicted else "measured"


def headline(data, prefix: str = "", depth: int = 0) -> dict[str, float | str]:
    """Scalar figures of a result: top level and two levels of nesting, no lists."""
    out: dict[str, float | str] = {}
    if not isinstance(data, dict):
        return out
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[name] = value
        elif isinstance(value, str) and depth == 0 and len(value) < 40:
            out[name] = value
        elif isinstance(value, dict) and depth < 2:
            out.update(headline(value, f"{name}/", depth + 1))
    return out


def record_lists(data) -> dict[str, list[dict]]:
    """The list-of-record entries of a result (``rows``, ``results``, ...)."""
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items()
            if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)}


def by_kind(scenario: str, figures: dict) -> dict[str, dict]:
    """Numeric ``figures`` split by :func:`kind`."""
    out: dict[str, dict] = {k: {} for k in KINDS}
    for key, value in figures.items():
        if isinstance(value, (int, float)):
            out[kind(scenario, key)][key] = value
    return out


def is_ratio(key: str) -> bool:
    """``speedup_vs_baseline``, ``native_over_hf``, ``predicted_vs_measured``,
    ``simulated_speedups/all_end_to_end``..."""
    last = words(key.split("/")[-1])
    return (bool(RATIO_WORDS & set(words(key))) or "over" in last[1:-1]
            or "vs" in last[1:-1])


def ratios(scenario: str, data) -> dict[str, dict[str, float]]:
    """Ratio figures of a result by kind, including those of its list-of-record rows
    (labelled by the row's first text field)."""
    out: dict[str, dict[str, float]] = {k: {} for k in KINDS}
    for k, v in headline(data).items():
        if isinstance(v, (int, float)) and is_ratio(k):
            out[kind(scenario, k)][k] = v
    for rows in record_lists(data).values():
        for i, row in enumerate(rows):
            figs = headline(row)
            label = next((v for v in figs.values() if isinstance(v, str)), str(i))
            for k, v in figs.items():
                if isinstance(v, (int, float)) and is_ratio(k):
                    out[kind(scenario, k)][f"{label}/{k}"] = v
    return out


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def scenario_markdown(name: str, data) -> list[str]:
    """One scenario: its headline figures and its row tables, one section per kind."""
    lines = [f"## {name}", ""]
    if isinstance(data, dict) and ("skipped" in data or "error" in data):
        lines += [f"{'skipped' if 'skipped' in data else 'error'}: "
                  f"{data.get('skipped') or data.get('error')}", ""]
    figs = headline(data)
    split = by_kind(name, figs)
    texts = {k: v for k, v in figs.items() if isinstance(v, str)}
    if texts:
        lines += ["| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in texts.items()] + [""]
    tables = record_lists(data)
    for k in KINDS:
        body: list[str] = []
        if split[k]:
            body += ["| figure | value |", "|---|---|"]
            body += [f"| {key} | {fmt(v)} |" for key, v in split[k].items()] + [""]
        for tname, rows in tables.items():
            flat = [headline(r) for r in rows]
            labels = [c for c in flat[0] if isinstance(flat[0][c], str)][:2]
            cols = [c for c in dict.fromkeys(c for r in flat for c in r)
                    if c not in labels and isinstance(next((r[c] for r in flat if c in r), ""),
                                                      (int, float))
                    and kind(name, c) == k][:14]
            if not cols:
                continue
            head = labels + cols
            body += [f"**{tname}** ({k})", "", "| " + " | ".join(head) + " |",
                     "|" + "---|" * len(head)]
            body += ["| " + " | ".join(fmt(r.get(c, "")) for c in head) + " |" for r in flat]
            body.append("")
        if body:
            lines += [f"### {TITLES[k]}", ""] + body
    return lines


def plot(all_ratios: dict[str, dict[str, float]], path: Path) -> None:
    """One horizontal-bar panel per kind of ratio, each labelled with its kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in KINDS if all_ratios.get(k)]
    heights = [0.32 * len(all_ratios[k]) + 1.0 for k in kinds]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, sum(heights) + 0.4),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    colors = {"measured": "#4c72b0", "predicted": "#dd8452",
              "predicted_vs_measured": "#55a868", "published": "#8172b3"}
    for ax, k in zip(axes[:, 0], kinds):
        names, values = list(all_ratios[k]), list(all_ratios[k].values())
        ax.barh(names, values, color=colors[k], hatch=None if k == "measured" else "//")
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_title(TITLES[k], fontsize=10, loc="left")
        ax.set_xlabel("ratio" if k != "predicted_vs_measured" else "predicted / measured")
        ax.tick_params(axis="y", labelsize=8)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    found = {}
    for name in SCENARIOS:
        f = args.results / f"{name}.json"
        if f.exists():
            try:
                found[name] = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                found[name] = {"error": f"unreadable result: {e}"}
    per_kind = {name: {"figures": by_kind(name, headline(data)), "ratios": ratios(name, data)}
                for name, data in found.items()}
    latest = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": args.device,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg": os.getloadavg()},
        "kinds": TITLES,
        "by_kind": per_kind,
        "scenarios": found,
    }
    (args.results / "latest.json").write_text(json.dumps(latest, indent=2))

    lines = [f"# fusedrl benchmarks ({latest['date']}, {args.device}, "
             f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})", "",
             "Figures are of four kinds, never mixed in one table: "
             + "; ".join(f"**{k}**: {t}" for k, t in TITLES.items()) + ".", ""]
    all_ratios: dict[str, dict[str, float]] = {k: {} for k in KINDS}
    for name, data in found.items():
        lines += scenario_markdown(name, data)
        for k, figs in per_kind[name]["ratios"].items():
            all_ratios[k].update({f"{name}: {key}": v for key, v in figs.items()})
    (args.results / "latest.md").write_text("\n".join(lines))
    if any(all_ratios.values()):
        plot(all_ratios, args.results / "ratios.png")
    print(f"wrote {args.results / 'latest.json'}, latest.md"
          + (", ratios.png" if any(all_ratios.values()) else ""))


if __name__ == "__main__":
    main()
