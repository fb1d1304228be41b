"""Collect ``bench/results/<scenario>.json`` into ``latest.json``, a Markdown table
(``latest.md``) of each scenario's headline figures, and a PNG of the ratios.

    python bench/report.py [--results bench/results] [--device cpu|gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

SCENARIOS = ("e2e", "sim_check", "gen", "realloc", "interstage", "schedule", "fused_train", "scaling",
             "plan", "sim", "peer")
# Words naming a measured ratio (fused vs baseline, ours vs peer, achieved vs limit).
RATIO_WORDS = {"speedup", "ratio", "fraction", "frac"}


def headline(data, prefix: str = "", depth: int = 0) -> dict[str, float | str]:
    """Scalar figures of a result: top level and one level of nesting, no lists."""
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


def row_tables(data) -> list[str]:
    """Markdown tables for list-of-record results (``rows``, ``results``, ...)."""
    out: list[str] = []
    if not isinstance(data, dict):
        return out
    for key, value in data.items():
        if not (isinstance(value, list) and value and all(isinstance(r, dict) for r in value)):
            continue
        rows = [headline(r) for r in value]
        cols = [c for c in rows[0] if not isinstance(rows[0][c], str) or len(rows) > 1][:12]
        out += [f"**{key}**", "", "| " + " | ".join(cols) + " |",
                "|" + "---|" * len(cols)]
        for r in rows:
            cells = [f"{r.get(c, ''):.4g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                     for c in cols]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return out


def is_ratio(key: str) -> bool:
    """``speedup_vs_baseline``, ``native_over_hf``, ``ratio_fused_over_sequential``..."""
    words = key.split("/")[-1].split("_")
    return bool(RATIO_WORDS & set(words)) or "over" in words[1:-1]


def ratios(data) -> dict[str, float]:
    """Ratio figures of a result, including those of its list-of-record rows (labelled
    by the row's first text field)."""
    out = {k: v for k, v in headline(data).items()
           if isinstance(v, (int, float)) and is_ratio(k)}
    if isinstance(data, dict):
        for key, rows in data.items():
            if not (isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)):
                continue
            for i, row in enumerate(rows):
                figs = headline(row)
                label = next((v for v in figs.values() if isinstance(v, str)), str(i))
                out.update({f"{label}/{k}": v for k, v in figs.items()
                            if isinstance(v, (int, float)) and is_ratio(k)})
    return out


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
    latest = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": args.device,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg": os.getloadavg()},
        "scenarios": found,
    }
    (args.results / "latest.json").write_text(json.dumps(latest, indent=2))

    lines = [f"# fusedrl benchmarks ({latest['date']}, {args.device}, "
             f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f})", ""]
    all_ratios: dict[str, float] = {}
    for name, data in found.items():
        figs = headline(data)
        lines += [f"## {name}", "", "| figure | value |", "|---|---|"]
        for k, v in figs.items():
            lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
        lines.append("")
        lines += row_tables(data)
        all_ratios.update({f"{name}: {k}": v for k, v in ratios(data).items()})
    (args.results / "latest.md").write_text("\n".join(lines))

    if all_ratios:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names, values = list(all_ratios), list(all_ratios.values())
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(names) + 1.2))
        ax.barh(names, values, color="#4c72b0")
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xlabel("ratio (measured in one run)")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(args.results / "ratios.png", dpi=110)
    print(f"wrote {args.results / 'latest.json'}, latest.md"
          + (", ratios.png" if all_ratios else ""))


if __name__ == "__main__":
    main()
