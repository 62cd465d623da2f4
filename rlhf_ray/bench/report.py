"""Benchmark figures and their report: results.json, a Markdown table, a PNG chart.

A `Figure` is one ratio with its spread and its goal. Two ways to get one from repeats:
`paired_ratio` when the two sides were measured alternately (one ratio per pair, then the
median), `ratio_of_medians` when each side is a separate run (its min and max are the extreme
pairings, so they bound every combination of the repeats).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Figure:
    """One benchmark figure: `value` (the median) in [low, high], compared with `goal`."""

    key: str
    title: str
    value: float | None  # None: not measured (see `note`)
    low: float | None
    high: float | None
    goal: float
    higher_is_better: bool
    unit: str = "×"
    details: dict[str, float] = field(default_factory=dict)  # the absolute numbers behind the ratio
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal

    @property
    def goal_text(self) -> str:
        return f"{'≥' if self.higher_is_better else '≤'} {format_value(self.goal, self.unit)}"


def skipped(key: str, title: str, goal: float, higher_is_better: bool, note: str, unit: str = "×") -> Figure:
    """A figure that could not be measured in this run, with the reason in `note`."""
    return Figure(key, title, None, None, None, goal, higher_is_better, unit, note=note)


def paired_ratio(numerators: list[float], denominators: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of numerators[i] / denominators[i] over alternately measured pairs."""
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def ratio_of_medians(numerators: list[float], denominators: list[float]) -> tuple[float, float, float]:
    """(median(a) / median(b), min(a) / max(b), max(a) / min(b)) for two separately measured runs."""
    return (
        statistics.median(numerators) / statistics.median(denominators),
        min(numerators) / max(denominators),
        max(numerators) / min(denominators),
    )


def spread(values: list[float]) -> dict[str, float]:
    """median, min and max of repeated measurements, for a figure's details."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "%":
        return f"{100 * value:.2f}%"
    return f"{value:.2f}{unit}"


# ---------------------------------------------------------------- writing


def write_json(path: Path, figures: list[Figure], meta: dict[str, Any]) -> None:
    """results.json: the run's metadata and every figure with its details and whether it met its goal."""
    rows = [asdict(f) | {"met": f.met, "goal_text": f.goal_text} for f in figures]
    path.write_text(json.dumps({"meta": meta, "figures": rows}, indent=2, allow_nan=False) + "\n")


def markdown(figures: list[Figure], meta: dict[str, Any], stages: dict[str, float] | None = None) -> str:
    """The results table (and the per-stage breakdown of one step, when measured) as Markdown."""
    lines = [
        f"# rlhf_ray benchmark ({meta['workload']['name']} workload)",
        "",
        f"{meta['machine']} · {meta['date']} · {meta['seconds']:.0f} s in all · load average "
        f"{meta['load_average'][0]:.1f} before, {meta['load_average'][1]:.1f} after. "
        "Each figure is the median of the repeats (warm-up discarded) with min–max.",
        "",
        *([f"Conditions: {meta['conditions']}", ""] if meta.get("conditions") else []),
        "| figure | measured | min–max | goal | met |",
        "| --- | ---: | ---: | ---: | :---: |",
    ]
    for f in figures:
        met = {True: "yes", False: "**no**", None: "n/a"}[f.met]
        span = f"{format_value(f.low, f.unit)}–{format_value(f.high, f.unit)}" if f.value is not None else "—"
        lines.append(f"| {f.title} | {format_value(f.value, f.unit)} | {span} | {f.goal_text} | {met} |")
    notes = [f"- **{f.title}**: {' '.join(f.note.split())}" for f in figures if f.note]
    if notes:
        lines += ["", *notes]
    if stages:
        total = sum(stages.values())
        lines += ["", "Median seconds per stage of one synchronous GRPO step:", "",
                  "| stage | s | share |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {s:.3f} | {100 * s / total:.1f}% |" for name, s in stages.items()]
    lines += ["", "Details (absolute numbers behind each ratio):", ""]
    for f in figures:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in f.details.items())
        lines.append(f"- `{f.key}`: {shown or '—'}")
    return "\n".join(lines) + "\n"


def plot(path: Path, figures: list[Figure]) -> None:
    """One panel per figure: the median as a bar, min–max as an error bar, the goal as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = math.ceil(len(figures) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, f in zip(axes.flat, figures):
        ax.set_title(f.title, fontsize=9)
        ax.set_xticks([])
        ax.axhline(f.goal, color="gray", linestyle="--", linewidth=1, label=f"goal {f.goal_text}")
        if f.value is None:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        else:
            color = "tab:green" if f.met else "tab:red"
            err = [[f.value - f.low], [f.high - f.value]]
            ax.bar([0], [f.value], width=0.5, color=color, yerr=err, capsize=6)
            ax.text(0.3, f.value, format_value(f.value, f.unit), ha="left", va="center", fontsize=10)
        ax.set_xlim(-1, 1)
        ax.set_ylim(0, 1.25 * max(f.goal, f.high or 0.0))
        ax.legend(fontsize=7, loc="upper right")
    for ax in list(axes.flat)[len(figures):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out_dir: Path, figures: list[Figure], meta: dict[str, Any], stages: dict[str, float] | None) -> str:
    """Write results.json, results.md and results.png into out_dir; returns the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "results.json", figures, meta)
    text = markdown(figures, meta, stages)
    (out_dir / "results.md").write_text(text)
    plot(out_dir / "results.png", figures)
    return text
