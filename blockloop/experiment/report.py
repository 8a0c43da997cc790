"""The experiment report: Markdown tables and PNG figures from an experiment's output directory.

`write_report(out_dir)` reads what the runner wrote (`experiment.json`: the plan;
`results.jsonl`: one record per run; each run's `metrics.jsonl`: the training curve; the names
are in `files`, so this module does not import the runner) and writes `report/report.md` with
which code made the runs (source hash, torch version and git commit of each run, runs made by
other code than the report's named) and, per section:

- a table per variant: unique parameters, effective depth, training FLOPs, tokens/s, wall time,
  best and final validation loss (accuracy for synthetic tasks, with the trivial-strategy floors
  beside it) as mean ± sample standard deviation over seeds, and the iterations used under
  automatic exit;
- figures, each followed by how to read it: validation curves against iterations and training
  FLOPs; test-time loop scaling (`loop_scaling` rows, keyed `num_loops`); the automatic-exit
  threshold sweep (`exit_sweep` rows); the recurrence-equivalence figure (where each looped model
  lands between its parameter-matched and depth-matched plain references); accuracy against the
  number of hops asked (tasks);
- generated samples (token data), and every failed run with its error.

Only records whose config hash matches the current plan are used, so a result left over from an
edited experiment file is never reported as current. Figures use matplotlib's object API with
the Agg canvas, so importing this module never changes the caller's matplotlib backend.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

from blockloop import stats
from blockloop.experiment.comparisons import compare, is_finite, section_pairs, summary_value
from blockloop.experiment.depth_protocol import section_markdown as depth_protocol_markdown
from blockloop.experiment.files import (
    PLAN_FILE,
    REPORT_DIR,
    RUN_METRICS_FILE,
    RUNS_DIR,
    load_results,
    safe_name,
)
from blockloop.analysis import compare_runs
from blockloop.errors import BlockloopError
from blockloop.records import code_identity, read_jsonl, same_code

FIG_DPI = 110
# Losses above log(vocab) + this margin are worse than guessing uniformly; drawing them to scale
# would flatten every informative curve, so they are drawn at the top edge with a marker.
LOSS_CLIP_MARGIN = 0.25
# Training-curve loss axes show the part of training after this fraction (see fig_training_curves).
ZOOM_FROM = 0.2
# x range of the recurrence-equivalence figure (0 = parameter-matched, 1 = depth-matched).
EQUIVALENCE_WINDOW = (-1.0, 2.0)


# ----------------------------------------------------------------------------------------------
# Loading


def _curve(run_dir: Path) -> dict:
    """Evaluation points of a run: iterations, FLOPs spent before them, val loss and accuracy."""
    recs = read_jsonl(Path(run_dir) / RUN_METRICS_FILE)
    evals = [r for r in recs if r.get("kind") == "eval"]
    train = [r for r in recs if r.get("kind") == "train" and "train_flops" in r]
    iters = np.array([r["iter"] for r in evals], dtype=float)
    if train:
        # train_flops is cumulative after step `iter`, so it is the cost of `iter + 1` steps.
        xp = np.array([0.0] + [r["iter"] + 1 for r in train])
        fp = np.array([0.0] + [r["train_flops"] for r in train])
        flops = np.interp(iters, xp, fp)
    else:
        flops = np.full(len(iters), np.nan)

    def col(key):
        return np.array([np.nan if r.get(key) is None else r[key] for r in evals], dtype=float)

    def per_group(key):  # (evals, groups); NaN where a record has no monitor (plain models)
        rows = [r.get(key) or [] for r in evals]
        width = max((len(row) for row in rows), default=0)
        return np.array([[np.nan if v is None else v for v in row] + [np.nan] * (width - len(row))
                         for row in rows], dtype=float).reshape(len(rows), width)

    return {"iters": iters, "flops": flops, "val_loss": col("val_loss"),
            "val_accuracy": col("val_accuracy"), "loop_lipschitz": per_group("loop_lipschitz"),
            "loop_delta_last": per_group("loop_delta_last")}


class SectionData:
    """A section of the plan with its current results, grouped by variant."""

    def __init__(self, info: dict, plan_runs: list, records: dict, out_dir: Path):
        self.name = info["name"]
        self.info = info
        self.runs_dir = Path(out_dir) / RUNS_DIR
        self.variants = info["variants"]
        self.by_variant = {v["name"]: [] for v in self.variants}
        self.failed = {v["name"]: [] for v in self.variants}
        self.missing = {v["name"]: [] for v in self.variants}
        for run in plan_runs:
            if run["section"] != self.name:
                continue
            rec = records.get(run["run_id"])
            if rec is None or rec.get("spec_hash") != run["spec_hash"]:
                self.missing[run["variant"]].append(run)
            elif rec.get("status") == "ok":
                rec = _current_keys(rec)
                rec["_curve"] = _curve(Path(out_dir) / RUNS_DIR / run["run_id"])
                self.by_variant[run["variant"]].append(rec)
            else:
                self.failed[run["variant"]].append(rec)
        for recs in self.by_variant.values():
            recs.sort(key=lambda r: r["seed"])
        first = next((r for recs in self.by_variant.values() for r in recs), None)
        self.is_task = first is not None and "floors" in first
        self.floors = first.get("floors") if first is not None else None
        self.vocab_size = first.get("vocab_size") if first is not None else None
        self.trained_hops = first.get("trained_hops") if first is not None else None
        palette = _palette(len(self.variants))
        self.colors = {v["name"]: palette[i] for i, v in enumerate(self.variants)}

    @property
    def metric(self) -> str:
        return "val_accuracy" if self.is_task else "val_loss"

    @property
    def metric_label(self) -> str:
        return "validation accuracy" if self.is_task else "validation loss"

    def looped(self) -> list:
        return [v for v in self.variants if v["looped"] and self.by_variant[v["name"]]]

    def summary_value(self, rec: dict) -> float | None:
        """The one number per run the comparisons use: best val loss, or final val accuracy."""
        return summary_value(rec, self.is_task)

    def values(self, name: str) -> dict:
        """seed -> summary value of variant `name`'s successful runs."""
        return {r["seed"]: self.summary_value(r) for r in self.by_variant.get(name, [])}

    @functools.cached_property
    def _comparisons(self) -> list:
        return [compare(a, self.values(a), b, self.values(b), higher_is_better=self.is_task)
                for a, b in section_pairs(self.variants)]

    def comparisons(self) -> list:
        """The section's seed-paired comparisons (`comparisons.section_pairs`), each the dict of
        `comparisons.compare`; computed once (the sign-flip test is a permutation test)."""
        return self._comparisons

    def comparison(self, a: str, b: str) -> dict | None:
        """The comparison of a with b (either order), or None if the section does not make it."""
        for c in self.comparisons():
            if {c["a"], c["b"]} == {a, b}:
                return c
        return None

    def loss_top(self) -> float | None:
        if self.is_task or not self.vocab_size:
            return None
        return math.log(self.vocab_size) + LOSS_CLIP_MARGIN


# Results written before the evaluation keys were unified (kept with --keep_other_code) name a
# row's iteration count "loops" (loop scaling, hops) or "max_loops" (exit sweep).
_OLD_ROW_KEYS = {"loop_scaling": "loops", "hops": "loops", "exit_sweep": "max_loops"}


def _current_keys(rec: dict) -> dict:
    """A copy of result record `rec` with every row's iteration count under "num_loops"."""
    out = dict(rec)
    for key, old in _OLD_ROW_KEYS.items():
        if out.get(key):
            out[key] = [{"num_loops": row[old], **row}
                        if old in row and "num_loops" not in row else row for row in out[key]]
    return out


def _palette(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Numbers and tables


def _stats(values) -> tuple[float, float | None, int]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), None, 0
    mean = sum(vals) / len(vals)
    sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return mean, sd, len(vals)


def _pm(values, fmt: str = "{:.4f}") -> str:
    mean, sd, n = _stats(values)
    if n == 0:
        return "—"
    return fmt.format(mean) + (f" ± {fmt.format(sd)}" if sd is not None else "")


def _ci(values, fmt: str = "{:.4f}") -> str:
    """Mean over seeds with its 95% Student-t interval, e.g. "1.9823 [1.9712, 1.9934]"."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "—"
    m = stats.mean_interval(vals)
    if m["low"] is None:
        return fmt.format(m["mean"]) + " (1 seed)"
    return f"{fmt.format(m['mean'])} [{fmt.format(m['low'])}, {fmt.format(m['high'])}]"


def _solve_cell(values, threshold: float) -> str:
    """Seeds at or above `threshold`, the rate and its 95% Wilson interval: "4/5, 0.80
    [0.38, 0.96]"."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "—"
    r = stats.solve_rate(vals, threshold)
    return f"{r['solved']}/{r['n']}, {r['rate']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"


def _median_cell(values, fmt: str = "{:.3f}") -> str:
    """Median over seeds with the range: "0.998 (0.512–1.000)"."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "—"
    return (f"{fmt.format(float(np.median(vals)))} "
            f"({fmt.format(min(vals))}–{fmt.format(max(vals))})")


def _si(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "—"
    for div, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def _md(text) -> str:
    return str(text).replace("|", "\\|")


def _summary_table(sec: SectionData) -> list:
    task = sec.is_task
    head = ["variant", "role", "unique params", "eff. depth", "iters", "train FLOPs", "tokens/s",
            "wall s"]
    threshold = sec.info.get("solve_threshold", 0.95)
    head += ([f"solved (final acc ≥ {threshold:g})", "final val acc, median (range)",
              "best floor", "final val loss"] if task
             else ["best val loss", "final val loss"])
    head += ["iters used, auto exit", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in sec.variants:
        recs = sec.by_variant[v["name"]]
        name = v["name"]
        role = "reference" if v["role"] == "baseline" else ("looped" if v["looped"] else "plain")
        if v["role"] == "baseline":
            role += " (added)"
        if not recs:
            n_fail = len(sec.failed[name])
            status = f"{n_fail} failed" if n_fail else "not run"
            cells = [_md(name), role] + ["—"] * (len(head) - 3) + [status]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        r0 = recs[0]
        exit_cell = "—"
        if v["looped"]:
            used = [r.get("exit_default", {}).get("mean_iterations") for r in recs]
            exit_cell = f"{_pm(used, '{:.2f}')} of {r0.get('max_loops')}"
        cells = [
            _md(name), role, f"{r0.get('n_params', 0):,}", str(r0.get("effective_depth", "—")),
            str(r0.get("iter_num", "—")),
            _si(_stats([r.get("train_flops") for r in recs])[0]),
            f"{_stats([r.get('tokens_per_sec') for r in recs])[0]:,.0f}",
            f"{_stats([r.get('wall_time_s') for r in recs])[0]:.1f}",
        ]
        if task:
            # The floor sits beside every accuracy: a failing model can look half right.
            floors = r0.get("floors") or {}
            accuracies = [r.get("final_val_accuracy") for r in recs]
            cells += [_solve_cell(accuracies, threshold), _median_cell(accuracies),
                      f"{max(floors.values()):.3f}" if floors else "—",
                      _ci([r.get("final_val_loss") for r in recs])]
        else:
            cells += [_ci([r.get("best_val_loss") for r in recs]),
                      _ci([r.get("final_val_loss") for r in recs])]
        n_fail = len(sec.failed[name])
        seeds = ", ".join(str(r["seed"]) for r in recs) + (f" ({n_fail} failed)" if n_fail else "")
        cells += [exit_cell, seeds]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _floors_text(floors: dict | None) -> str:
    if not floors:
        return ""
    names = {"uniform": "uniform guess", "majority": "majority answer",
             "copy_last": "copy the last token", "anything_but_last": "anything but the last token"}
    parts = []
    for k, v in floors.items():
        label = names.get(k, k.replace("_", " "))
        parts.append(f"{label} {v:.3f}")
    return ("Trivial-strategy floors on this held-out set (a model at or below these has learnt "
            "nothing useful): " + ", ".join(parts) + f"; best floor **{max(floors.values()):.3f}**.")


def gap_fractions(sec: SectionData, v: dict) -> tuple[list, dict] | None:
    """Per seed, the fraction of the parameter-to-depth gap that looped variant `v` closes:
    0 = as good as the parameter-matched plain model, 1 = as good as the depth-matched one.

    Returns (fractions, details) or None when a reference has no result. fractions: (seed,
    fraction) over the seeds where all three have a result and the references differ; details:
    the references' names and means, the looped mean, the gap, "closed" (stats.gap_closed over
    the common seeds: the ratio of means with a bootstrap interval resampling seeds jointly) and
    "unreliable": the two references do not differ significantly (paired by seed), so there is
    no measured gap and the fraction is noise."""
    refs = v.get("references") or {}
    if "param" not in refs or "depth" not in refs:
        return None
    p_vals, d_vals = sec.values(refs["param"]), sec.values(refs["depth"])
    v_vals = sec.values(v["name"])
    if not (p_vals and d_vals and v_vals):
        return None
    seeds = [s for s in sorted(v_vals)
             if all(is_finite(x.get(s)) for x in (p_vals, d_vals, v_vals))]
    fractions = [(s, (v_vals[s] - p_vals[s]) / (d_vals[s] - p_vals[s])) for s in seeds
                 if abs(d_vals[s] - p_vals[s]) > 1e-12]
    refs_compared = sec.comparison(refs["depth"], refs["param"])
    closed = None
    if seeds:
        # gap_closed's "losses" read as any metric: the ratio is the same for accuracies.
        closed = stats.gap_closed([p_vals[s] for s in seeds], [v_vals[s] for s in seeds],
                                  [d_vals[s] for s in seeds])
    p_mean = _stats(p_vals.values())[0]
    d_mean = _stats(d_vals.values())[0]
    details = {
        "param": refs["param"], "depth": refs["depth"], "param_value": p_mean,
        "depth_value": d_mean, "value": _stats(v_vals.values())[0], "gap": d_mean - p_mean,
        "closed": closed, "seeds": seeds,
        "unreliable": refs_compared is None or not refs_compared["significant"],
    }
    return fractions, details


def _equivalence_unreliable(sec: SectionData) -> list:
    out = []
    for v in sec.looped():
        res = gap_fractions(sec, v)
        if res is not None:
            out.append(res[1]["unreliable"])
    return out


def _closed_cell(closed: dict | None) -> str:
    """The fraction of the gap closed with its bootstrap interval, e.g. "0.62 [0.41, 0.80]"."""
    if closed is None or closed["estimate"] is None:
        return "—"
    if closed["low"] is None or closed["high"] is None:
        return f"{closed['estimate']:.2f} (no interval)"
    return f"{closed['estimate']:.2f} [{closed['low']:.2f}, {closed['high']:.2f}]"


def _equivalence_table(sec: SectionData) -> list:
    rows = []
    fmt = "{:.3f}" if sec.is_task else "{:.4f}"
    for v in sec.looped():
        res = gap_fractions(sec, v)
        if res is None:
            continue
        _, d = res
        notes = (["the references do not differ significantly: no measured gap, the fraction "
                  "is noise"] if d["unreliable"] else [])
        n_runs = len(sec.by_variant[v["name"]])
        if len(d["seeds"]) < n_runs:
            notes.append(f"from the {len(d['seeds'])} of {n_runs} seeds all three have")
        rows.append(
            f"| {_md(v['name'])} | {_md(d['param'])} ({fmt.format(d['param_value'])}) | "
            f"{_md(d['depth'])} ({fmt.format(d['depth_value'])}) | {fmt.format(d['value'])} | "
            f"{_closed_cell(d['closed'])} | {'; '.join(notes)} |"
        )
    if not rows:
        return []
    what = "final val accuracy" if sec.is_task else "best val loss"
    if all(_equivalence_unreliable(sec)):
        rows += ["", "In this section no pair of references differs significantly (paired by "
                 "seed): at this budget extra depth does not measurably help the plain model, so "
                 "there is no gap for looping to close and the fractions are noise."]
    head = (f"| looped variant | parameter-matched ({what}) | depth-matched ({what}) | "
            f"looped ({what}) | fraction of gap closed [95% bootstrap interval] | note |")
    rows += ["", "The bootstrap resamples the seeds jointly; with 3 to 5 seeds it cannot see "
             "variation the seeds did not show, so its interval is narrower than it should be: "
             "read it with the seeds' spread in the figure."]
    return [head, "|---|---|---|---|---|---|"] + rows


def _p_cell(p: float | None) -> str:
    if p is None:
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _comparisons_table(sec: SectionData) -> list:
    """Every comparison of the section with its seed-paired difference, interval and tests."""
    rows = []
    fmt = "{:.3f}" if sec.is_task else "{:.4f}"
    for c in sec.comparisons():
        if c["n"] == 0:
            continue
        diff = fmt.format(c["mean_diff"])
        if c["low"] is not None:
            diff += f" [{fmt.format(c['low'])}, {fmt.format(c['high'])}]"
        verdict = (f"**{_md(c['winner'])} better**" if c["winner"] else
                   "not significant" if c["n"] > 1 else "one seed: no test")
        rows.append(f"| {_md(c['a'])} − {_md(c['b'])} | {diff} | {c['n']} | "
                    f"{_p_cell(c['p_value'])} | {_p_cell(c['p_value_sign_flip'])} | {verdict} |")
    if not rows:
        return []
    what = "final val accuracy" if sec.is_task else "best val loss"
    return [f"| comparison ({what}) | mean difference [95% interval] | seeds | p (paired t) | "
            "p (sign flip) | verdict |", "|---|---|---|---|---|---|"] + rows


def _findings(sec: SectionData) -> list:
    """Prose for the significant comparisons only: a difference whose interval includes 0 is
    not stated as a finding."""
    units = "in final accuracy" if sec.is_task else "nats in best validation loss"
    lines = []
    for c in sec.comparisons():
        if not c["winner"]:
            continue
        loser = c["b"] if c["winner"] == c["a"] else c["a"]
        fmt = "{:.3f}" if sec.is_task else "{:.4f}"
        size = fmt.format(abs(c["mean_diff"]))
        low, high = (fmt.format(x) for x in sorted((abs(c["low"]), abs(c["high"]))))
        p = _p_cell(c["p_value"])
        lines.append(f"- `{c['winner']}` beats `{loser}` by {size} {units} (95% interval "
                     f"{low} to {high}, {c['n']} seeds paired, paired t-test "
                     f"p {p if p.startswith('<') else '= ' + p}).")
    if not lines:
        return ["No difference between the compared variants is significant at 95% with these "
                "seeds; the table above lists them with their intervals."]
    return ["Significant at 95% (paired by seed); only these are stated as findings:", ""] + lines


# ----------------------------------------------------------------------------------------------
# Figures


def _new_figure(ncols: int = 1, width: float = 7.5, height: float = 4.6):
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=FIG_DPI, bbox_inches="tight")


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Labels, grid and legend of a one-axes figure, then the figure saved to `path`."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax)
    _save(fig, path)


def _legend(ax, fig=None, outside: bool = True) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if outside:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
                  frameon=False)
    else:
        ax.legend(handles, labels, fontsize=8)


def _clip(values: np.ndarray, top: float | None) -> tuple[np.ndarray, np.ndarray]:
    if top is None:
        return values, np.zeros(len(values), dtype=bool)
    over = values > top
    return np.where(over, top, values), over


def _plot_clipped(ax, x, y, top, **kwargs):
    y_plot, over = _clip(np.asarray(y, dtype=float), top)
    line = ax.plot(x, y_plot, **kwargs)[0]
    if over.any():
        ax.plot(np.asarray(x)[over], y_plot[over], linestyle="none", marker="^", markersize=8,
                color=line.get_color(), markerfacecolor="none")
    return line


def _floor_line(ax, sec: SectionData) -> None:
    if sec.floors:
        best = max(sec.floors.values())
        ax.axhline(best, color="0.4", linestyle=":", linewidth=1.2,
                   label=f"best trivial floor ({best:.2f})")


def fig_training_curves(sec: SectionData, path: Path) -> str | None:
    fig, (ax_it, ax_fl) = _new_figure(2, width=13, height=4.8)
    drawn = False
    # Loss falls steeply at first; scaling the axis to the start would flatten the differences at
    # the end, which are what the comparison is about. The loss axis therefore starts from the
    # highest mean loss after the first ZOOM_FROM of training.
    zoom_top, zoom_bottom = [], []
    for v in sec.variants:
        zoom = _variant_curves((ax_it, ax_fl), sec, v)
        if zoom is None:
            continue
        if zoom[0] is not None:
            zoom_top.append(zoom[0])
            zoom_bottom.append(zoom[1])
        drawn = True
    if not drawn:
        return None
    zoomed = not sec.is_task and bool(zoom_top)
    for ax in (ax_it, ax_fl):
        if sec.is_task:
            _floor_line(ax, sec)
        elif zoomed:
            low, high = min(zoom_bottom), max(zoom_top)
            pad = 0.05 * (high - low)
            ax.set_ylim(low - pad, high + pad)
        ax.set_ylabel(sec.metric_label)
        ax.grid(alpha=0.3)
    ax_it.set_xlabel("training iterations")
    ax_fl.set_xlabel("training FLOPs")
    ax_it.set_title(f"{sec.metric_label} vs iterations")
    ax_fl.set_title(f"{sec.metric_label} vs training FLOPs")
    _legend(ax_fl)
    _save(fig, path)
    better = "higher" if sec.is_task else "lower"
    return (f"Each line is one variant's {sec.metric_label} at the evaluation points (mean over "
            f"seeds; the shaded band spans the seeds; dashed lines are plain references added by "
            f"the runner). Left: against training iterations; right: against training FLOPs, "
            f"where a looped model pays for every iteration it runs. {better.capitalize()} is "
            f"better. A looped variant that is better than its parameter-matched reference at "
            f"equal iterations but not at equal FLOPs buys its gain with compute."
            + (" The dotted line is the best trivial strategy: curves on it have learnt nothing."
               if sec.is_task else "")
            + (f" The loss axis is zoomed on the last {1 - ZOOM_FROM:.0%} of training; the "
               f"early, steep part of the curves runs off the top." if zoomed else ""))


def _variant_curves(axes, sec: SectionData, v: dict) -> tuple | None:
    """Draws variant `v`'s mean curve (and seed band) against iterations and FLOPs; returns
    (highest late mean, lowest value) for the zoom, (None, None) without a late part, or None
    when the variant has no curve."""
    recs = sec.by_variant[v["name"]]
    curves = [r["_curve"] for r in recs if len(r["_curve"]["iters"])]
    if not curves:
        return None
    top = sec.loss_top()
    n = min(len(c["iters"]) for c in curves)
    ys = np.array([c[sec.metric][:n] for c in curves])
    mean = np.nanmean(ys, axis=0)
    iters = curves[0]["iters"][:n]
    late = mean[iters >= ZOOM_FROM * iters[-1]]
    zoom = (float(np.nanmax(late)), float(np.nanmin(ys))) if len(late) else (None, None)
    color = sec.colors[v["name"]]
    style = "--" if v["role"] == "baseline" else "-"
    label = v["name"] + (f" ({len(curves)} seeds)" if len(curves) > 1 else " (1 seed)")
    for ax, xkey in zip(axes, ("iters", "flops")):
        x = np.nanmean(np.array([c[xkey][:n] for c in curves]), axis=0)
        _plot_clipped(ax, x, mean, top, color=color, linestyle=style, marker=".", label=label)
        if len(curves) > 1:
            lo, hi = np.nanmin(ys, axis=0), np.nanmax(ys, axis=0)
            lo, _ = _clip(lo, top)
            hi, _ = _clip(hi, top)
            ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)
    return zoom


def _reference_lines(ax, sec: SectionData, top) -> None:
    """Plain references of the looped variants as horizontal lines (they have no loop count)."""
    refs = []
    for v in sec.looped():
        for kind in ("param", "depth"):
            name = (v.get("references") or {}).get(kind)
            if name and name not in refs and sec.by_variant.get(name):
                refs.append(name)
    for name in refs:
        value = _stats([sec.summary_value(r) if sec.is_task else r.get("final_val_loss")
                        for r in sec.by_variant[name]])[0]
        if math.isfinite(value):
            ax.axhline(min(value, top) if top else value, color=sec.colors[name], linestyle=":",
                       linewidth=1.3, label=f"{name} (plain reference)")


def _mean_series(recs, key, xkey, ykey):
    """x values and per-x mean/min/max of ykey over runs, for list-of-dict results."""
    table = {}
    for r in recs:
        for row in r.get(key) or []:
            if row.get(ykey) is not None:
                table.setdefault(row[xkey], []).append(row[ykey])
    xs = sorted(table)
    return (np.array(xs, dtype=float), np.array([np.mean(table[x]) for x in xs]),
            np.array([np.min(table[x]) for x in xs]), np.array([np.max(table[x]) for x in xs]))


def _diverged_counts(recs, ykey) -> list:
    """Iteration counts at which some run's loop-scaling value is None (non-finite: diverged)."""
    return sorted({row["num_loops"] for r in recs for row in r.get("loop_scaling") or []
                   if row.get(ykey) is None})


def _mark_diverged(ax, recs, ykey, top, color) -> None:
    """Counts where a run diverged, as crosses along the top edge (they have no value)."""
    xs = _diverged_counts(recs, ykey)
    if xs:
        y = top if top else ax.get_ylim()[1]
        ax.plot(xs, [y] * len(xs), marker="X", markersize=9, color=color, linestyle="none",
                label="diverged (non-finite)")


def _loop_vs_layer(sec: SectionData, variant: dict) -> dict | None:
    """CKA of the variant's iterates against its depth-matched reference's layers (the first
    seed both have), or None where there is no reference or a checkpoint cannot be read."""
    refs = {r["seed"]: r for r in sec.by_variant.get(variant["references"].get("depth"), [])}
    rec = next((r for r in sec.by_variant[variant["name"]] if r["seed"] in refs), None)
    if rec is None:
        return None
    try:
        return compare_runs(sec.runs_dir / rec["run_id"], sec.runs_dir / refs[rec["seed"]]["run_id"])
    except BlockloopError:
        return None


def fig_loop_vs_layer(sec: SectionData, path: Path) -> str | None:
    """One heatmap per looped variant: CKA of its first looped unit's iterates (rows) against
    the block outputs of its depth-matched plain reference (columns)."""
    results = [(v, _loop_vs_layer(sec, v)) for v in sec.looped()]
    results = [(v, r) for v, r in results if r is not None]
    if not results:
        return None
    fig, axes = _new_figure(len(results), width=4.2 * len(results), height=4.0)
    for ax, (v, res) in zip(axes, results):
        unit = res["units"][0]
        cka = np.array([[np.nan if c is None else c for c in row] for row in unit["cka"]])
        image = ax.imshow(cka, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        matched = [(m, t) for t, m in enumerate(unit["matched_layer"]) if m is not None]
        ax.plot([m for m, _ in matched], [t for _, t in matched], "s", mfc="none", mec="red",
                markersize=9, label="depth-matched layer")
        ax.set_yticks(range(cka.shape[0]))
        ax.set_xticks(range(cka.shape[1]))
        ax.set_xlabel(f"layer output of {v['references']['depth']}")
        ax.set_ylabel("iterate t")
        ax.set_title(f"{v['name']}, blocks {unit['blocks'][0]}-{unit['blocks'][-1]}", fontsize=9)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="linear CKA")
    _save(fig, path)
    return ("Linear CKA between each iterate of a looped variant's first looped unit (rows, "
            "s_0 is its input) and each block output of its depth-matched plain reference "
            "(columns, 0 is the embedding), seed of the first run both have, on two validation "
            "batches. Red squares mark the layer at each iterate's depth in the unrolled stack: "
            "a bright diagonal through them means the loop imitates depth; bright cells "
            "elsewhere mean iterate t computes what another layer does.")


def fig_loop_monitor(sec: SectionData, path: Path) -> str | None:
    """Lipschitz estimate and last-iteration change of every looped variant's loop groups
    against training steps (mean over seeds), from the training-time monitor."""
    looped = [v for v in sec.looped()
              if any(r["_curve"]["loop_lipschitz"].size for r in sec.by_variant[v["name"]])]
    if not looped:
        return None
    fig, (ax_l, ax_d) = _new_figure(2, width=12, height=4.6)
    for v in looped:
        curves = [r["_curve"] for r in sec.by_variant[v["name"]] if r["_curve"]["loop_lipschitz"].size]
        n = min(len(c["iters"]) for c in curves)
        for g in range(curves[0]["loop_lipschitz"].shape[1]):
            style = dict(color=sec.colors[v["name"]], linestyle=["-", "--", ":", "-."][g % 4])
            label = v["name"] + (f" (group {g})" if curves[0]["loop_lipschitz"].shape[1] > 1 else "")
            for ax, key in ((ax_l, "loop_lipschitz"), (ax_d, "loop_delta_last")):
                ys = np.nanmean([c[key][:n, g] for c in curves], axis=0)
                ax.plot(curves[0]["iters"][:n], ys, marker="o", markersize=3, label=label, **style)
    ax_l.axhline(1.0, color="gray", linestyle=":")
    ax_l.set_xlabel("training iteration")
    ax_l.set_ylabel("Lipschitz estimate of the last iteration")
    ax_l.set_title("Is the loop becoming a contraction?")
    ax_l.grid(alpha=0.3)
    ax_d.set_yscale("log")
    # The legend goes beside the right panel, so it covers neither.
    _finish(fig, ax_d, path, "training iteration", "relative change at the last iteration",
            "Does the loop settle?")
    return ("Left: the local Lipschitz constant of each loop group's iteration map at its last "
            "iteration (largest singular value of its Jacobian, a few power iterations on a few "
            "validation sequences), mean over seeds, at every evaluation. Below the dotted line "
            "at 1 the last iteration contracts: the state is approaching a fixed point. Right: "
            "the relative change of the state at the last iteration (log scale); falling means "
            "more iterations change less.")


def fig_loop_scaling(sec: SectionData, path: Path) -> str | None:
    looped = sec.looped()
    if not looped:
        return None
    fig, (ax,) = _new_figure(1, width=8.5, height=4.8)
    ykey = "accuracy" if sec.is_task else "loss"
    top = sec.loss_top()
    ticks = set()
    for v in looped:
        recs = sec.by_variant[v["name"]]
        xs, mean, lo, hi = _mean_series(recs, "loop_scaling", "num_loops", ykey)
        if not len(xs):
            continue
        ticks.update(int(x) for x in xs)
        color = sec.colors[v["name"]]
        _plot_clipped(ax, xs, mean, top, color=color, marker="o", markersize=4,
                      label=f"{v['name']} (trained at {recs[0].get('max_loops')})")
        if len(recs) > 1:
            ax.fill_between(xs, _clip(lo, top)[0], _clip(hi, top)[0], color=color, alpha=0.15,
                            linewidth=0)
        _mark_diverged(ax, recs, ykey, top, color)
        trained = recs[0].get("max_loops")
        if trained in xs:
            y = mean[list(xs).index(trained)]
            ax.plot([trained], [min(y, top) if top else y], marker="*", markersize=14,
                    color=color, markeredgecolor="black", linestyle="none")
    _reference_lines(ax, sec, top)
    if sec.is_task:
        _floor_line(ax, sec)
    ax.set_xscale("log", base=2)
    # Every evaluated count gets a tick, so the trained count (often not a power of 2) is read off.
    ax.set_xticks(sorted(ticks))
    ax.xaxis.set_major_formatter(_int_formatter())
    ax.xaxis.set_minor_locator(NullLocator())
    _finish(fig, ax, path, "iterations of the looped blocks at test time (log scale)",
            sec.metric_label, "Test-time loop scaling")
    clip = (f" Losses above ln(vocab) + {LOSS_CLIP_MARGIN} (worse than uniform guessing) are "
            f"drawn at the top edge as hollow triangles." if top else "")
    clip += (" Crosses on the top edge mark counts where a run diverged (non-finite loss)."
             if any(_diverged_counts(sec.by_variant[v["name"]], ykey) for v in looped) else "")
    return ("Each looped variant evaluated with the looped blocks run a fixed number of times "
            "(no automatic exit), from 1 to well beyond the count it was trained with (the star). "
            "Dotted horizontal lines are the plain references. A curve that keeps improving, or "
            "stays flat, to the right of the star extrapolates: more test-time compute helps or at "
            "least does not hurt; a curve that turns up has learnt a fixed-depth computation."
            + clip)


def _int_formatter():
    return FuncFormatter(lambda x, _: f"{x:g}")


def fig_exit_sweep(sec: SectionData, path: Path) -> str | None:
    looped = [v for v in sec.looped() if any(r.get("exit_sweep") for r in sec.by_variant[v["name"]])]
    if not looped:
        return None
    fig, (ax,) = _new_figure(1, width=8.5, height=4.8)
    ykey = "accuracy" if sec.is_task else "loss"
    top = sec.loss_top()
    cap = 0
    for v in looped:
        recs = sec.by_variant[v["name"]]
        color = sec.colors[v["name"]]
        points = {}
        for r in recs:
            for row in r.get("exit_sweep") or []:
                if row.get(ykey) is not None and row.get("mean_iterations") is not None:
                    points.setdefault(row["threshold"], []).append(
                        (row["mean_iterations"], row[ykey]))
                    cap = max(cap, row.get("num_loops", 0))
        ths = sorted(points, reverse=True)
        xs = np.array([np.mean([p[0] for p in points[t]]) for t in ths])
        ys = np.array([np.mean([p[1] for p in points[t]]) for t in ths])
        _plot_clipped(ax, xs, ys, top, color=color, marker="o", markersize=5,
                      label=f"{v['name']}: automatic exit")
        fx, fmean, _, _ = _mean_series(recs, "loop_scaling", "num_loops", ykey)
        keep = fx <= max(cap, 1)
        _plot_clipped(ax, fx[keep], fmean[keep], top, color=color, linestyle="--", alpha=0.6,
                      label=f"{v['name']}: fixed count")
    _finish(fig, ax, path, "mean iterations used (per token or sequence)", sec.metric_label,
            "Automatic exit: quality vs iterations used")
    thresholds = sorted({row["threshold"] for v in looped for r in sec.by_variant[v["name"]]
                         for row in r.get("exit_sweep") or []}, reverse=True)
    granularity = {row.get("granularity", "sequence") for v in looped
                   for r in sec.by_variant[v["name"]] for row in r.get("exit_sweep") or []}
    saved = [row["block_applications_saved"] for v in looped for r in sec.by_variant[v["name"]]
             for row in r.get("exit_sweep") or [] if row.get("block_applications_saved") is not None]
    who = ("each token stops on its own (token granularity: causal, so every loss here is one "
           "no later token influenced)" if granularity == {"token"} else
           "a sequence stops as a whole (sequence granularity: later tokens help decide the "
           "depth of earlier ones, so these losses are not causal)")
    saving = (f" Block applications saved per token against running every iteration range from "
              f"{min(saved):.2f} to {max(saved):.2f} over the thresholds." if saved else "")
    return (f"Solid lines: automatic exit ({who}, once its state changes by less than the "
            "threshold between iterations), one point per threshold "
            f"({', '.join(f'{t:g}' for t in thresholds)}; a larger threshold stops earlier, "
            f"further left), with at most {cap} iterations. Dashed lines: the same model at a fixed "
            "iteration count. Where a solid line lies below (loss) or above (accuracy) its dashed "
            "line, exit spends the iterations where they matter; where the points bunch at the "
            "right, the state never settles and exit saves nothing." + saving)


def fig_equivalence(sec: SectionData, path: Path) -> str | None:
    rows = []
    for v in sec.looped():
        res = gap_fractions(sec, v)
        if res is not None and res[0]:
            rows.append((v, *res))
    if not rows:
        return None
    fig, (ax,) = _new_figure(1, width=8.5, height=1.4 + 0.6 * len(rows))
    # A fixed window: when the two references nearly tie the fraction can be -30 or +40, and
    # scaling the axis to it would squeeze the informative [0, 1] range to a sliver. Values
    # outside are drawn at the edge as arrows, with their value written beside them.
    lo, hi = EQUIVALENCE_WINDOW
    ax.axvspan(lo, 0, color="0.92", zorder=0)
    ax.axvspan(1, hi, color="0.92", zorder=0)
    ax.axvline(0, color="0.3", linewidth=1.2)
    ax.axvline(1, color="0.3", linewidth=1.2)
    for i, (v, fractions, d) in enumerate(rows):
        _equivalence_row(ax, i, sec.colors[v["name"]], [f for _, f in fractions], d)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0]["name"] for r in rows])
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.invert_yaxis()
    ax.set_xlim(lo, hi)
    ax.set_xlabel("fraction of the parameter-to-depth gap closed")
    ax.set_title("Recurrence equivalence", pad=22)
    ax.text(0, 1.01, "parameter-matched", transform=ax.get_xaxis_transform(), ha="center",
            va="bottom", fontsize=8)
    ax.text(1, 1.01, "depth-matched", transform=ax.get_xaxis_transform(), ha="center",
            va="bottom", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    what = "final validation accuracy" if sec.is_task else "best validation loss"
    return (f"For each looped variant, where its {what} lands between its two plain references: "
            "0 = no better than the parameter-matched model (same unique blocks, no loop), "
            "1 = as good as the depth-matched model (as many unique blocks as the looped model's "
            "effective depth). Dots are seeds (each against the references of the same seed), the "
            "diamond the estimate of the table below (ratio of the seed means), the line the range "
            "over seeds. Outside [0, 1] (shaded) the looped "
            "model is worse than its parameter-matched or better than its depth-matched reference; "
            f"values beyond [{lo:g}, {hi:g}] are drawn as arrows at the edge. Where the two "
            "references do not differ significantly (paired by seed) there is no measured gap to "
            "close: the fraction is noise, and the row is faded and marked.")


def _in_window(x: float) -> tuple[float, str, bool]:
    """Position of fraction `x` inside EQUIVALENCE_WINDOW, its marker, and whether it was
    clipped to the window's edge."""
    lo, hi = EQUIVALENCE_WINDOW
    margin = 0.04 * (hi - lo)
    if x < lo + margin:
        return lo + margin, "<", True
    if x > hi - margin:
        return hi - margin, ">", True
    return x, "o", False


def _equivalence_row(ax, i: int, color, fs: list, d: dict) -> None:
    """Row `i` of the recurrence-equivalence figure: seeds, their range and their mean."""
    lo, hi = EQUIVALENCE_WINDOW
    alpha = 0.35 if d["unreliable"] else 1.0
    for f in fs:
        x, marker, _ = _in_window(f)
        ax.scatter([x], [i], color=color, alpha=0.6 * alpha, s=30, marker=marker, zorder=3)
    closed = d.get("closed") or {}
    # The diamond is the table's estimate (ratio of the seed means), not the mean of the
    # per-seed ratios, which a seed with nearly tied references can throw anywhere.
    mean = closed.get("estimate")
    mean = float(np.mean(fs)) if mean is None else mean
    xm, _, clipped = _in_window(mean)
    left, right = _in_window(min(fs))[0], _in_window(max(fs))[0]
    ax.plot([left, right], [i, i], color=color, alpha=alpha, linewidth=1.5, zorder=2)
    ax.plot([xm], [i], marker="D", color=color, markeredgecolor="black", markersize=8,
            alpha=alpha, linestyle="none", zorder=4)
    note = f"estimate {mean:.2f}" if clipped else ""
    if d["unreliable"]:
        note = (note + ", " if note else "") + "references do not differ significantly"
    if note:
        ax.annotate(note, (xm, i), textcoords="offset points", xytext=(0, 9),
                    ha="right" if xm > (lo + hi) / 2 else "left", fontsize=7, color="0.25")


def fig_hops(sec: SectionData, path: Path) -> str | None:
    have = [v for v in sec.variants if any(r.get("hops") for r in sec.by_variant[v["name"]])]
    if not have:
        return None
    fig, (ax,) = _new_figure(1, width=8.5, height=4.8)
    floors, trained_answer = {}, {}
    for v in have:
        recs = sec.by_variant[v["name"]]
        color = sec.colors[v["name"]]
        trained = recs[0].get("max_loops", 1)
        per_loops = {}
        for r in recs:
            for row in r.get("hops") or []:
                per_loops.setdefault(row["num_loops"], {}).setdefault(row["hops"], []).append(
                    row["accuracy"])
                floors[row["hops"]] = max(row["floors"].values())
                if "trained_answer_accuracy" in row:
                    trained_answer[row["hops"]] = row["trained_answer_accuracy"]
        for loops, table in sorted(per_loops.items()):
            xs = sorted(table)
            ys = [np.mean(table[x]) for x in xs]
            extra = loops != trained
            label = v["name"] + (f" at {loops} iterations (x{loops // trained})" if extra else "")
            ax.plot(xs, ys, color=color, marker="o" if not extra else "s", markersize=5,
                    linestyle="--" if extra else "-", label=label)
    if floors:
        xs = sorted(floors)
        ax.plot(xs, [floors[x] for x in xs], color="0.4", linestyle=":", marker="x",
                label="best trivial floor")
    if trained_answer:
        xs = sorted(trained_answer)
        ax.plot(xs, [trained_answer[x] for x in xs], color="black", linestyle="-.", marker="+",
                markersize=9, linewidth=1.0, alpha=0.6, zorder=1,
                label=f"always the {sec.trained_hops}-hop answer")
    if sec.trained_hops:
        ax.axvline(sec.trained_hops, color="0.5", linewidth=1)
        ax.text(sec.trained_hops, 1.01, f"trained at {sec.trained_hops} hop(s)",
                transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("hops asked at test time")
    ax.set_ylabel("accuracy on held-out inputs")
    ticks = sorted({row["hops"] for v in have for r in sec.by_variant[v["name"]]
                    for row in r.get("hops") or []})
    ax.set_xticks(ticks)
    ax.set_xlim(ticks[0] - 0.4, ticks[-1] + 0.4)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Accuracy vs hops", pad=18)
    ax.grid(alpha=0.3)
    _legend(ax)
    _save(fig, path)
    return ("Every model, trained at the marked hop count, is asked for the answer at other hop "
            "counts on the same held-out inputs (mean over seeds). Solid lines: the iteration "
            "count it was trained with; dashed lines: looped models run for twice as many "
            "iterations. The dotted line is the best trivial strategy at each hop count; the "
            "dash-dotted line is what a model scores that always gives the answer at the trained "
            "hop count (the answers at different hop counts often coincide, which is why every "
            "curve can zigzag). A model that solves more hops than it was trained on rises above "
            "the dash-dotted line to the right of the trained count; if looping longer did that, "
            "a looped model's dashed line would lie above its solid line there.")


# ----------------------------------------------------------------------------------------------
# The report


def _section_markdown(sec: SectionData, report_dir: Path) -> list:
    """The Markdown of one section: setup, summary table, figures, samples and failures."""
    lines = _section_header(sec)
    if sec.is_task:
        lines += [_floors_text(sec.floors), ""]
    lines += _summary_table(sec)
    lines += ["", "Wall time is the training loop only (not process start or post-training "
              "evaluation). 'iters used, auto exit' is the mean number of loop iterations at the "
              "model's own exit threshold, out of the trained count. Intervals are 95%: "
              "Student-t for means, Wilson for solve rates.", ""]
    table = _comparisons_table(sec)
    if table:
        lines += ["### Comparisons", "", *table, "", *_findings(sec), ""]
    lines += _figures_markdown(sec, report_dir)
    lines += depth_protocol_markdown(sec, report_dir)
    lines += _samples_markdown(sec)
    lines += _failures_markdown(sec)
    missing = [run["run_id"] for runs in sec.missing.values() for run in runs]
    if missing:
        lines += [f"Not run yet: {', '.join(missing)}.", ""]
    return lines


def _section_header(sec: SectionData) -> list:
    info = sec.info
    lines = [f"## Section `{sec.name}`", ""]
    if info.get("description"):
        lines += [info["description"], ""]
    budget = info["budget"]
    if "iters" in budget:
        lines.append(f"Budget: **{budget['iters']:,} iterations** per run, the same for every "
                     f"variant.")
    else:
        lines.append(f"Budget: **{_si(budget['flops'])} training FLOPs** per run; each variant "
                     f"gets the iterations that cost that much (column 'iters').")
    seeds = info["seeds"]
    if len(seeds) > 1:
        lines.append(f"Seeds: {', '.join(map(str, seeds))} (every run of a seed sees the same "
                     f"training batches, every run the same evaluation batches; comparisons are "
                     f"paired by seed).")
    else:
        lines.append(f"Seeds: only {seeds[0]}: this section's budget allows one seed, so no "
                     f"spread is shown and differences may be seed noise.")
    adaptive = info.get("adaptive_seeds")
    if adaptive:
        more = [f"`{v['name']}` {v['seeds'][len(seeds):]}" for v in sec.variants
                if len(v.get("seeds", seeds)) > len(seeds)]
        lines.append(f"Adaptive seeding (comparisons narrower than {adaptive['target_width']:g}, "
                     f"at most {adaptive['max_seeds']} seeds per variant and "
                     f"{adaptive['max_runs']} added runs): "
                     + ("added " + "; ".join(more) if more else "no seed needed adding") + ".")
    added = [v for v in sec.variants if v["role"] == "baseline"]
    if added:
        lines.append("Plain references added by the runner: " + "; ".join(
            f"`{v['name']}` (for {', '.join(v['baseline_for'])})" for v in added) + ".")
    return lines + [""]


def _figures_markdown(sec: SectionData, report_dir: Path) -> list:
    """Draws the section's figures into `report_dir`; each with how to read it."""
    figures = [("Validation curves", "training_curves", fig_training_curves),
               ("Test-time loop scaling", "loop_scaling", fig_loop_scaling),
               ("Loop dynamics during training", "loop_monitor", fig_loop_monitor),
               ("Loop against layer", "loop_vs_layer", fig_loop_vs_layer),
               ("Automatic exit", "exit_sweep", fig_exit_sweep),
               ("Recurrence equivalence", "recurrence_equivalence", fig_equivalence)]
    if sec.is_task:
        figures.append(("Accuracy vs hops", "accuracy_vs_hops", fig_hops))
    lines = []
    for title, stem, func in figures:
        filename = f"{safe_name(sec.name)}_{stem}.png"
        how = func(sec, report_dir / filename)
        extra = _equivalence_table(sec) if stem == "recurrence_equivalence" else []
        if how is None and not extra:
            continue
        lines += [f"### {title}", ""]
        if how is not None:
            lines += [f"![{title}]({filename})", "", f"*How to read it:* {how}", ""]
        if extra:
            lines += extra + [""]
    return lines


def _samples_markdown(sec: SectionData) -> list:
    samples = [(v["name"], sec.by_variant[v["name"]][0]) for v in sec.variants
               if sec.by_variant[v["name"]] and sec.by_variant[v["name"]][0].get("samples")]
    if not samples:
        return []
    lines = ["### Samples", "", "Generated from a newline with temperature "
             f"{sec.info['evaluation'].get('sample_temperature')}, first seed of each variant.",
             ""]
    for name, rec in samples:
        lines.append(f"**{_md(name)}** (seed {rec['seed']}):")
        lines.append("")
        for text in rec["samples"]:
            lines += ["```text", text.replace("```", "'''"), "```", ""]
    return lines


def _failures_markdown(sec: SectionData) -> list:
    failures = [(name, rec) for name, recs in sec.failed.items() for rec in recs]
    if not failures:
        return []
    lines = ["### Failed runs", ""]
    for name, rec in failures:
        error = (rec.get("error") or "unknown error").strip()
        lines += [f"- **{_md(name)}**, seed {rec.get('seed')}: FAILED", "", "  ```text"]
        lines += ["  " + line for line in error.splitlines()[-12:]]
        lines += ["  ```", ""]
    return lines


def _code_lines(sections: list) -> list:
    """Which code made the reported runs (`records.code_identity`), one line per identity; runs
    made by other code than this report's (kept with --keep_other_code) are named."""
    groups = {}
    for sec in sections:
        for recs in list(sec.by_variant.values()) + list(sec.failed.values()):
            for rec in recs:
                code = rec.get("code") if isinstance(rec.get("code"), dict) else {}
                key = (code.get("source_sha256"), code.get("torch"), code.get("git_commit"))
                groups.setdefault(key, []).append(rec["run_id"])
    if not groups:
        return []
    lines = ["Code that made these runs:"]
    for (source, torch_version, commit), run_ids in sorted(groups.items(), key=str):
        what = (f"source `{source}`, torch {torch_version}, commit "
                f"`{commit[:12] if commit else 'none'}`")
        if source is None:
            lines.append(f"- **{len(run_ids)} run(s) by unrecorded code** (results written "
                         f"before runs recorded their code): {', '.join(sorted(run_ids))}")
        elif same_code({"source_sha256": source, "torch": torch_version}):
            lines.append(f"- {len(run_ids)} run(s) by this code ({what})")
        else:
            lines.append(f"- **{len(run_ids)} run(s) by other code** ({what}; this report's "
                         f"code is `{code_identity()['source_sha256']}`): "
                         f"{', '.join(sorted(run_ids))}")
    return lines + [""]


def write_report(out_dir, report_dir=None) -> Path:
    """Write report.md and its figures for the experiment in `out_dir`; returns report.md's path."""
    out_dir = Path(out_dir)
    report_dir = Path(report_dir) if report_dir is not None else out_dir / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    info = json.loads((out_dir / PLAN_FILE).read_text())
    records = load_results(out_dir)
    sections = [SectionData(s, info.get("runs", []), records, out_dir) for s in info["sections"]]
    lines = [f"# Experiment `{info['name']}`", ""]
    if info.get("description"):
        lines += [info["description"], ""]
    lines.append(f"Experiment file: `{info.get('file')}`. Output: `{info.get('out_dir')}`.")
    if "wall_time_s" in info:
        wall = info["wall_time_s"]
        lines.append(
            f"Last invocation: started {info.get('started_at')}, {wall / 60:.1f} min wall for "
            f"{info.get('runs_to_do')} runs ({info.get('runs_skipped')} of {info.get('runs_total')} "
            f"reused from before), {info.get('jobs')} at a time with {info.get('threads_per_run')} "
            f"thread(s) each on {info.get('cpus')} CPUs."
            + ("" if info.get("finished", True) else " It was interrupted."))
    n_failed = sum(len(r) for s in sections for r in s.failed.values())
    if n_failed:
        lines.append(f"**{n_failed} run(s) failed**; see 'Failed runs' in their section.")
    lines.append("")
    lines += _code_lines(sections)
    for sec in sections:
        lines += _section_markdown(sec, report_dir)
    path = report_dir / "report.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path
