"""The cross-model test-time depth protocol: is running a model longer like training it deeper?

Evaluating a looped model at more iterations than it was trained with can look like test-time
scaling when it is not. A section that asks for the protocol (`cross_model_depth` in the
experiment file, see `spec`) trains the same unique blocks at every count r of `train_loops`
and evaluates every run at every count r' (`plan` adds them to its test-time counts, `child`
measures them as `loop_scaling` rows on the same evaluation batches). From those rows this
module writes the section's part of the report (`report` calls `section_markdown`):

- a figure: the section's metric against the evaluated count r', one line per trained r with
  its 95% Student-t interval over seeds (`stats.mean_interval`), the points r' = r marked;
- a table: rows trained r, columns evaluated r', mean over seeds;
- a verdict for every pair r < r': the model trained at r and run at r' against the model
  trained at r', paired by seed (`stats.paired_difference`): beats, ties (not significant) or
  loses; and one sentence that states only the significant findings.

The metric is the report's (`SectionData.metric`): validation loss (lower is better), or
accuracy for synthetic tasks (higher is better). A failed or missing run has no values; a
non-finite value (a diverged evaluation, stored as None) is marked and never averaged, and its
seed is left out of the pairs it belongs to. The section arrives duck-typed (`SectionData`), so
this module does not import the report (which imports it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

from blockloop.experiment.comparisons import CONFIDENCE
from blockloop.experiment.comparisons import compare as paired_comparison
from blockloop.experiment.files import safe_name
from blockloop.stats import mean_interval

FIG_DPI = 110  # as the rest of the report
OUTCOMES = ("beats", "ties", "loses", "undetermined")


@dataclass
class DepthGrid:
    """The protocol's numbers: for each trained count r and evaluated count r', the metric of
    every seed (NaN where the evaluation was non-finite)."""

    train_loops: list  # the trained counts r, ascending
    variants: dict  # r -> the variant trained at r
    values: dict = field(default_factory=dict)  # (r, r') -> {seed: value}
    runs: dict = field(default_factory=dict)  # r -> {"ok": [seeds], "failed": n, "missing": n}
    higher_is_better: bool = False
    label: str = "validation loss"

    def at(self, r: int, r_eval: int) -> dict:
        """{seed: value} of the model trained at r run at r_eval ({} if never evaluated)."""
        return self.values.get((r, r_eval), {})

    def evaluated(self, r: int) -> list:
        """The counts the model trained at r was evaluated at, ascending."""
        return sorted(x for (t, x) in self.values if t == r)

    def fmt(self, x: float) -> str:
        return f"{x:.3f}" if self.higher_is_better else f"{x:.4f}"


@dataclass
class Verdict:
    """The model trained at `short` run at `long` against the model trained at `long`."""

    short: int
    long: int
    outcome: str  # one of OUTCOMES
    test: dict | None  # stats.paired_difference of (short at long) - (long at long)
    seeds: list  # the seeds paired
    excluded: list  # seeds with a non-finite value on either side

    def phrase(self) -> str:
        """The verdict in words, e.g. "trained at 2, run at 4, beats trained at 4"."""
        head = f"trained at {self.short}, run at {self.long},"
        return {
            "beats": f"{head} beats trained at {self.long}",
            "ties": f"{head} ties with trained at {self.long} (not significant)",
            "loses": f"{head} loses to trained at {self.long}",
            "undetermined": f"{head} cannot be compared with trained at {self.long} "
                            f"(fewer than 2 seeds with both values)",
        }[self.outcome]


# ----------------------------------------------------------------------------------------------
# Numbers


def _finite(value) -> float:
    return float(value) if value is not None and math.isfinite(value) else math.nan


def grid_from_section(sec) -> DepthGrid | None:
    """The protocol's grid of section `sec` (a report.SectionData), or None if the section did
    not ask for the protocol."""
    request = sec.info.get("cross_model_depth")
    if not request:
        return None
    ykey = "accuracy" if sec.is_task else "loss"
    grid = DepthGrid(train_loops=sorted(e["train_loops"] for e in request["trained"]),
                     variants={e["train_loops"]: e["variant"] for e in request["trained"]},
                     higher_is_better=sec.is_task, label=sec.metric_label)
    for r, name in grid.variants.items():
        recs = sec.by_variant.get(name, [])
        grid.runs[r] = {"ok": [rec["seed"] for rec in recs],
                        "failed": len(sec.failed.get(name, [])),
                        "missing": len(sec.missing.get(name, []))}
        for rec in recs:
            for row in rec.get("loop_scaling") or []:
                cell = grid.values.setdefault((r, row["num_loops"]), {})
                cell[rec["seed"]] = _finite(row.get(ykey))
    return grid


def cell_interval(seed_values: dict) -> dict | None:
    """`stats.mean_interval` of the finite values of a cell, or None if it has none."""
    finite = [v for v in seed_values.values() if math.isfinite(v)]
    return mean_interval(finite, CONFIDENCE) if finite else None


def compare(grid: DepthGrid, short: int, long: int) -> Verdict:
    """The model trained at `short` run at `long` against the one trained at `long`, paired by
    seed (`comparisons.compare`); significant when the paired t interval of the difference
    excludes 0."""
    a, b = grid.at(short, long), grid.at(long, long)
    c = paired_comparison("short", a, "long", b, grid.higher_is_better)
    excluded = [s for s in sorted(set(a) & set(b)) if s not in c["seeds"]]
    if c["n"] < 2:
        outcome = "undetermined"
    elif c["winner"] is None:
        outcome = "ties"
    else:
        outcome = "beats" if c["winner"] == "short" else "loses"
    return Verdict(short, long, outcome, c if c["n"] else None, c["seeds"], excluded)


def verdicts(grid: DepthGrid) -> list:
    """`compare` for every pair r < r' of the trained counts."""
    counts = grid.train_loops
    return [compare(grid, r, r2) for i, r in enumerate(counts) for r2 in counts[i + 1:]]


def summary_sentence(found: list) -> str:
    """One sentence with the significant verdicts only (or that there are none)."""
    beats = [f"({v.short}, {v.long})" for v in found if v.outcome == "beats"]
    loses = [f"({v.short}, {v.long})" for v in found if v.outcome == "loses"]
    if not beats and not loses:
        return (f"No model run beyond its trained count differs significantly "
                f"({CONFIDENCE:.0%} paired t interval over seeds) from the model trained at "
                f"that count.")
    parts = []
    if beats:
        parts.append(f"beats the model trained at r' for (r, r') = {', '.join(beats)}")
    if loses:
        parts.append(f"loses to the model trained at r' for (r, r') = {', '.join(loses)}")
    return (f"Significant at {CONFIDENCE:.0%} (paired t interval over seeds): a model trained "
            f"at r and run at r' > r " + "; it ".join(parts) + ".")


# ----------------------------------------------------------------------------------------------
# Tables


def _cell_text(grid: DepthGrid, r: int, r_eval: int) -> str:
    """A table cell: the mean over seeds (bold on the diagonal) with what is missing marked."""
    values = grid.at(r, r_eval)
    if not values:
        # The run has results but not at this count: the model cannot run it (e.g. "concat"
        # injection built for one iteration, see blockloop.looping.max_runnable_loops).
        return "not runnable" if grid.runs[r]["ok"] else "—"
    interval = cell_interval(values)
    n_bad = sum(not math.isfinite(v) for v in values.values())
    text = "non-finite" if interval is None else grid.fmt(interval["mean"])
    if r == r_eval and interval is not None:
        text = f"**{text}**"
    if n_bad and interval is not None:
        text += f" ({n_bad} of {len(values)} seeds non-finite)"
    return text


def _runs_text(grid: DepthGrid, r: int) -> str:
    runs = grid.runs[r]
    parts = [", ".join(map(str, runs["ok"])) or "none"]
    if runs["failed"]:
        parts.append(f"{runs['failed']} failed")
    if runs["missing"]:
        parts.append(f"{runs['missing']} not run")
    return parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")


def matrix_table(grid: DepthGrid) -> list:
    """Markdown: rows trained r, columns evaluated r', the mean over seeds."""
    head = ["trained at r (variant)"] + [f"run at {x}" for x in grid.train_loops] + ["seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in grid.train_loops:
        cells = [f"{r} (`{grid.variants[r]}`)"]
        cells += [_cell_text(grid, r, x) for x in grid.train_loops]
        lines.append("| " + " | ".join(cells + [_runs_text(grid, r)]) + " |")
    return lines


def _p(p) -> str:
    return "—" if p is None else f"{p:.3g}"


def verdict_table(grid: DepthGrid, found: list) -> list:
    """Markdown: one row per pair r < r' with the paired difference, its interval and tests."""
    head = (f"| trained at r, run at r' | against trained at r' | difference "
            f"({CONFIDENCE:.0%} interval) | p, t-test | p, sign flip | seeds paired | verdict |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for v in found:
        diff = "—"
        if v.test is not None:
            diff = f"{v.test['mean_diff']:+.4f}"
            if v.test["low"] is not None:
                diff += f" [{v.test['low']:+.4f}, {v.test['high']:+.4f}]"
        seeds = ", ".join(map(str, v.seeds)) or "none"
        if v.excluded:
            seeds += f" (left out, non-finite: {', '.join(map(str, v.excluded))})"
        verdict = v.phrase()
        if v.outcome in ("beats", "loses"):
            verdict = f"**{verdict}**"
        test = v.test or {}
        lines.append(f"| {v.short} at {v.long} | {v.long} at {v.long} | {diff} | "
                     f"{_p(test.get('p_value'))} | {_p(test.get('p_value_sign_flip'))} | "
                     f"{seeds} | {verdict} |")
    return lines


# ----------------------------------------------------------------------------------------------
# The figure


def _series(grid: DepthGrid, r: int, top: float | None):
    """x, mean, low, high (NaN where undefined, clipped at `top`) and the counts with a
    non-finite seed, for the line of the model trained at r."""
    xs = grid.evaluated(r)
    cells = [cell_interval(grid.at(r, x)) for x in xs]

    def col(key):
        ys = np.array([math.nan if c is None or c[key] is None else c[key] for c in cells])
        if grid.higher_is_better:
            # An accuracy: a t interval from few seeds can reach past [0, 1], which means nothing.
            return np.clip(ys, 0.0, 1.0)
        return np.minimum(ys, top) if top is not None else ys

    bad = [x for x in xs if any(not math.isfinite(v) for v in grid.at(r, x).values())]
    return np.array(xs, dtype=float), col("mean"), col("low"), col("high"), bad


def _draw_line(ax, grid: DepthGrid, r: int, color, top: float | None):
    """The line of the model trained at r with its band; returns its point at r' = r."""
    xs, mean, low, high, bad = _series(grid, r, top)
    if not len(xs):
        return None
    ax.plot(xs, mean, color=color, marker="o", markersize=4, label=f"trained at {r}")
    if np.isfinite(low).any():
        ax.fill_between(xs, low, high, color=color, alpha=0.15, linewidth=0)
    if top is not None and (mean >= top).any():
        ax.plot(xs[mean >= top], mean[mean >= top], linestyle="none", marker="^",
                markersize=8, color=color, markerfacecolor="none")
    if bad:
        ax.plot(bad, [0.98] * len(bad), transform=ax.get_xaxis_transform(), marker="X",
                markersize=9, color=color, linestyle="none")
    if r in xs and math.isfinite(mean[list(xs).index(r)]):
        y = mean[list(xs).index(r)]
        ax.plot([r], [y], marker="*", markersize=15, color=color, markeredgecolor="black",
                linestyle="none", zorder=5)
        return r, y
    return None


def fig_depth_protocol(grid: DepthGrid, path: Path, top: float | None = None) -> str | None:
    """The figure (x: evaluated count, one line per trained count); returns how to read it, or
    None when no run has values."""
    if not any(grid.evaluated(r) for r in grid.train_loops):
        return None
    fig = Figure(figsize=(8.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["viridis"]
    n = len(grid.train_loops)
    diagonal = []
    for i, r in enumerate(grid.train_loops):
        point = _draw_line(ax, grid, r, cmap(0.9 * i / max(n - 1, 1)), top)
        if point is not None:
            diagonal.append(point)
    if len(diagonal) > 1:
        ax.plot(*zip(*diagonal), color="black", linestyle="--", linewidth=1.2, zorder=4,
                label="trained at r' (r' = r)")
    ticks = sorted({x for r in grid.train_loops for x in grid.evaluated(r)})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("iterations run at test time, r' (log scale)")
    ax.set_ylabel(grid.label)
    ax.set_title("Cross-model test-time depth")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.savefig(path, dpi=FIG_DPI, bbox_inches="tight")
    better = "higher" if grid.higher_is_better else "lower"
    return (f"Each line is the same unique blocks trained at one iteration count r and evaluated "
            f"at every count r' (mean over seeds, band: {CONFIDENCE:.0%} t interval over seeds; "
            f"{better} is better). Stars mark r' = r, joined by the dashed line: the model "
            f"trained at each count. Where a line lies beyond the dashed line to the right of "
            f"its star, running that model longer does better than training at the longer "
            f"count; where it falls short, extra iterations at test time are no substitute for "
            f"training with them. Crosses at the top mark counts where a seed's value was "
            f"non-finite (left out of the mean)"
            + ("; hollow triangles, values clipped at ln(vocab) + margin." if top else "."))


# ----------------------------------------------------------------------------------------------
# The report's section


def section_markdown(sec, report_dir: Path) -> list:
    """The protocol's Markdown for section `sec` (a report.SectionData), drawing its figure
    into `report_dir`; [] if the section did not ask for the protocol."""
    grid = grid_from_section(sec)
    if grid is None:
        return []
    found = verdicts(grid)
    filename = f"{safe_name(sec.name)}_cross_model_depth.png"
    how = fig_depth_protocol(grid, Path(report_dir) / filename, sec.loss_top())
    intro = (f"The same unique blocks (`{sec.info['cross_model_depth']['variant']}`) trained "
             f"at each count r in {grid.train_loops}, each evaluated at every count r' on the "
             f"same evaluation batches ({grid.label}). Running a model beyond its trained count "
             f"is test-time scaling only if it matches the model trained at that count.")
    lines = ["### Cross-model test-time depth", "", intro, ""]
    if how is not None:
        lines += [f"![Cross-model test-time depth]({filename})", "", f"*How to read it:* {how}",
                  ""]
    lines += matrix_table(grid) + ["", "Mean over seeds; bold: r' = r.", ""]
    lines += verdict_table(grid, found)
    better = "higher" if grid.higher_is_better else "lower"
    note = (f"Difference: the model trained at r run at r' minus the model trained at r', paired "
            f"by seed ({better} is better); the verdict follows the t interval. The sign-flip "
            f"test cannot reach 0.05 with fewer than 6 seeds.")
    return lines + ["", note, "", f"**Summary:** {summary_sentence(found)}", ""]
