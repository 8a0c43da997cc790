"""Which variants a section compares, and the seed-paired statistics of each comparison.

One summary number per run (best validation loss; final accuracy for a synthetic task) is
compared between variants paired by seed: every run of a seed sees the same training batches,
so a same-seed difference removes the data order's share of the noise. The pairs a section
compares (`section_pairs`):

- for every looped variant, its parameter-matched and its depth-matched plain reference
  (the runner adds them; `blockloop.experiment.plan.REFERENCES`);
- the two references against each other: only where they differ significantly is there a
  gap for looping to close;
- in a section without looped variants, every variant against the first.

The report states in prose only the comparisons marked significant here, and the runner's
adaptive seeding (`wide_pairs`) adds seeds to the comparisons whose interval is still wider
than the experiment file asks. The statistics are `blockloop.stats`; this module only decides
what is compared with what.
"""

from __future__ import annotations

import math

from blockloop import stats

CONFIDENCE = 0.95


def section_pairs(variants: list) -> list[tuple[str, str]]:
    """(a, b) names of the comparisons of a section, `variants` as in the plan (dicts with
    "name", "looped" and "references"), each pair once, in a stable order."""
    pairs = []

    def add(a, b):
        if a != b and (a, b) not in pairs and (b, a) not in pairs:
            pairs.append((a, b))

    looped = [v for v in variants if v.get("looped")]
    for v in looped:
        refs = v.get("references") or {}
        for kind in ("param", "depth"):
            if kind in refs:
                add(v["name"], refs[kind])
        if "param" in refs and "depth" in refs:
            add(refs["depth"], refs["param"])
    if not looped:
        for v in variants[1:]:
            add(v["name"], variants[0]["name"])
    return pairs


def summary_value(rec: dict, is_task: bool) -> float | None:
    """The number a run is compared by: final validation accuracy for a synthetic task (higher
    is better), else best validation loss (nats per token, lower is better)."""
    return rec.get("final_val_accuracy") if is_task else rec.get("best_val_loss")


def is_task_result(rec: dict) -> bool:
    """Whether a run's result is from a synthetic task (its result carries the task's floors)."""
    return "floors" in rec


def section_values(sec_info: dict, plan_runs: list, records: dict) -> dict:
    """variant name -> {seed: summary value} for the section's current, successful runs.

    sec_info: a section of the plan (experiment.json); plan_runs: the plan's "runs" (dicts with
    run_id, section, variant, seed, spec_hash); records: run_id -> result record. A record whose
    spec hash differs from the plan's (a leftover of an edited experiment) is not current."""
    values = {v["name"]: {} for v in sec_info["variants"]}
    for run in plan_runs:
        rec = records.get(run["run_id"])
        if (run["section"] != sec_info["name"] or rec is None or rec.get("status") != "ok"
                or rec.get("spec_hash") != run["spec_hash"]):
            continue
        values.setdefault(run["variant"], {})[run["seed"]] = summary_value(
            rec, is_task_result(rec))
    return values


def paired_values(a: dict, b: dict) -> tuple[list, list, list]:
    """(seeds, values of a, values of b) over the seeds where both have a finite value; a and b
    map seed -> value (None for a run without one)."""
    seeds = sorted(s for s in a if s in b and is_finite(a[s]) and is_finite(b[s]))
    return seeds, [a[s] for s in seeds], [b[s] for s in seeds]


def compare(name_a: str, values_a: dict, name_b: str, values_b: dict,
            higher_is_better: bool) -> dict:
    """The seed-paired comparison of a with b (seed -> value each).

    Returns stats.paired_difference's fields (difference a - b in the values' units, its 95%
    Student-t interval, p-values; "significant" when the interval excludes 0) plus "a", "b",
    "seeds" and "winner": the better name where significant, else None. With fewer than two
    common seeds there is no interval and nothing is significant.
    """
    seeds, xa, xb = paired_values(values_a, values_b)
    out = {"a": name_a, "b": name_b, "seeds": seeds, "winner": None}
    if not seeds:
        return {**out, "n": 0, "mean_diff": None, "low": None, "high": None,
                "p_value": None, "p_value_sign_flip": None, "significant": False}
    out.update(stats.paired_difference(xa, xb, confidence=CONFIDENCE))
    if out["significant"]:
        a_better = (out["mean_diff"] > 0) == higher_is_better
        out["winner"] = name_a if a_better else name_b
    return out


def interval_width(comparison: dict) -> float:
    """Width of the comparison's interval, in the values' units (inf without an interval)."""
    if comparison["low"] is None or comparison["high"] is None:
        return math.inf
    return comparison["high"] - comparison["low"]


def wide_pairs(pairs: list, values: dict, planned: dict, target_width: float) -> list:
    """The pairs of `pairs` whose 95% interval is wider than `target_width`, where more seeds
    can help: a pair with a run that has no finite value (failed or diverged) is left out, since
    further seeds of a failing variant would only spend the budget. `values` maps variant ->
    {seed: value}; `planned` variant -> the seeds it was run with."""
    out = []
    for a, b in pairs:
        complete = all(sum(is_finite(values.get(n, {}).get(s)) for s in planned.get(n, []))
                       == len(planned.get(n, [])) for n in (a, b))
        comparison = compare(a, values.get(a, {}), b, values.get(b, {}), higher_is_better=True)
        if complete and interval_width(comparison) > target_width:
            out.append((a, b))
    return out


def is_finite(x) -> bool:
    """Whether x is a real number (not None, not a bool) and finite."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
