"""Tests for blockloop.experiment.comparisons and the report's statistics: which pairs a section
compares, the seed-paired tests against scipy computed here independently, the report stating
only significant findings, and adaptive seeding end to end on a tiny p-hop experiment."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from blockloop.experiment import RESULTS_FILE, load_results, main
from blockloop.experiment.comparisons import (
    compare,
    section_pairs,
    section_values,
    wide_pairs,
)
from blockloop.experiment.report import (
    SectionData,
    _comparisons_table,
    _findings,
    _summary_table,
    gap_fractions,
)
from tests.test_experiment import TASK_BASE, write_char_data, write_experiment


def variant(name, looped=False, param=None, depth=None, role="variant"):
    refs = {k: v for k, v in (("param", param), ("depth", depth)) if v}
    return {"name": name, "looped": looped, "references": refs, "role": role,
            "baseline_for": []}


def test_pairs_are_each_looped_variant_against_both_references_and_the_references_together():
    variants = [variant("loop_a", True, "plain_L2", "plain_L4"),
                variant("loop_b", True, "plain_L2", "plain_L6"),
                variant("plain_L2", role="baseline"), variant("plain_L4", role="baseline"),
                variant("plain_L6", role="baseline")]
    assert section_pairs(variants) == [
        ("loop_a", "plain_L2"), ("loop_a", "plain_L4"), ("plain_L4", "plain_L2"),
        ("loop_b", "plain_L2"), ("loop_b", "plain_L6"), ("plain_L6", "plain_L2")]
    plain_only = [variant("x"), variant("y"), variant("z")]
    assert section_pairs(plain_only) == [("y", "x"), ("z", "x")]


def test_compare_pairs_by_seed_and_matches_scipy():
    a = {1: 1.90, 2: 1.93, 3: 1.88, 4: 1.95, 5: None}
    b = {1: 1.95, 2: 1.97, 3: 1.94, 4: 1.99, 6: 2.0}
    c = compare("a", a, "b", b, higher_is_better=False)
    assert c["seeds"] == [1, 2, 3, 4]
    xa, xb = np.array([1.90, 1.93, 1.88, 1.95]), np.array([1.95, 1.97, 1.94, 1.99])
    d = xa - xb
    assert c["mean_diff"] == pytest.approx(d.mean())
    half = scipy_stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2.0
    assert c["low"] == pytest.approx(d.mean() - half)
    assert c["high"] == pytest.approx(d.mean() + half)
    assert c["p_value"] == pytest.approx(scipy_stats.ttest_rel(xa, xb).pvalue)
    # Lower loss is better: a wins. For an accuracy the same numbers make b the winner.
    assert c["significant"] and c["winner"] == "a"
    assert compare("a", a, "b", b, higher_is_better=True)["winner"] == "b"


def test_compare_without_a_clear_difference_names_no_winner():
    a = {1: 0.5, 2: 0.9, 3: 0.4}
    b = {1: 0.6, 2: 0.5, 3: 0.55}
    c = compare("a", a, "b", b, higher_is_better=True)
    assert not c["significant"] and c["winner"] is None
    one = compare("a", {1: 0.5}, "b", {1: 0.6}, higher_is_better=True)
    assert one["low"] is None and one["winner"] is None
    assert compare("a", {}, "b", {1: 0.6}, higher_is_better=True)["n"] == 0


def test_seeds_are_added_only_to_wide_comparisons():
    values = {"x": {1: 1.0, 2: 1.1, 3: 1.05}, "y": {1: 1.5, 2: 1.61, 3: 1.54},
              "z": {1: 1.2, 2: 0.9, 3: 1.4}}
    pairs = [("y", "x"), ("z", "x")]
    narrow = compare("y", values["y"], "x", values["x"], True)
    wide = compare("z", values["z"], "x", values["x"], True)
    width = (narrow["high"] - narrow["low"] + wide["high"] - wide["low"]) / 2
    planned = {name: [1, 2, 3] for name in values}
    assert wide_pairs(pairs, values, planned, width) == [("z", "x")]
    assert wide_pairs(pairs, values, planned, 10.0) == []
    # One seed: no interval at all, so more seeds are needed whatever the target.
    one = {"x": {1: 1.0}, "y": {1: 1.2}}
    assert wide_pairs([("y", "x")], one, {"x": [1], "y": [1]}, 10.0) == [("y", "x")]
    # A run that failed (no value) or diverged (non-finite) cannot be mended by more seeds.
    assert wide_pairs([("y", "x")], one, {"x": [1], "y": [1, 2]}, 10.0) == []
    assert wide_pairs([("y", "x")], {"x": {1: 1.0}, "y": {1: float("nan")}},
                      {"x": [1], "y": [1]}, 10.0) == []


# ---------------------------------------------------------------------------------------------
# The report's statistics on hand-made results


def section(values: dict, looped=None, task=False):
    """A SectionData over hand-made records: values maps variant -> {seed: summary value}."""
    looped = looped or {}
    variants = [variant(n, n in looped, *looped.get(n, (None, None))) for n in values]
    runs, records = [], {}
    for name, by_seed in values.items():
        for seed, value in by_seed.items():
            run_id = f"s/{name}-s{seed}"
            runs.append({"run_id": run_id, "section": "s", "variant": name, "seed": seed,
                         "spec_hash": "h"})
            rec = {"run_id": run_id, "seed": seed, "status": "ok", "spec_hash": "h",
                   "best_val_loss": value, "final_val_loss": value, "n_params": 1,
                   "effective_depth": 1}
            if task:
                rec.update(final_val_accuracy=value, floors={"uniform": 0.25})
            records[run_id] = rec
    info = {"name": "s", "variants": variants, "budget": {"iters": 1}, "seeds": [1],
            "evaluation": {}, "solve_threshold": 0.9}
    return SectionData(info, runs, records, "/nonexistent"), info, runs, records


def test_findings_state_only_significant_differences():
    rng = np.random.default_rng(0)
    base = {s: 2.0 + 0.05 * rng.standard_normal() for s in range(1, 6)}
    values = {
        "plain_L2": base,
        "plain_L4": {s: v - 0.10 + 0.002 * rng.standard_normal() for s, v in base.items()},
        "plain_L3": {s: v + 0.05 * rng.standard_normal() for s, v in base.items()},
    }
    sec, info, runs, records = section(values)
    assert section_values(info, runs, records)["plain_L4"] == values["plain_L4"]
    text = "\n".join(_findings(sec))
    assert "`plain_L4` beats `plain_L2`" in text
    assert "plain_L3" not in text
    table = "\n".join(_comparisons_table(sec))
    assert "plain_L3 − plain_L2" in table and "not significant" in table
    assert "**plain_L4 better**" in table


def test_nothing_significant_says_so():
    sec, *_ = section({"a": {1: 1.0, 2: 1.2}, "b": {1: 1.1, 2: 1.05}})
    assert _findings(sec)[0].startswith("No difference")


def test_task_summary_shows_solve_rates_with_wilson_intervals_and_medians():
    accuracies = {1: 1.0, 2: 0.97, 3: 0.52, 4: 0.99, 5: 0.6}
    sec, *_ = section({"plain_L2": accuracies}, task=True)
    row = _summary_table(sec)[2]
    low, high = scipy_stats.binomtest(3, 5).proportion_ci(method="wilson")
    assert f"3/5, 0.60 [{low:.2f}, {high:.2f}]" in row
    assert "0.970 (0.520–1.000)" in row


def test_gap_closed_is_unreliable_when_the_references_do_not_differ():
    clear = section({"loop": {1: 1.95, 2: 1.96, 3: 1.97},
                     "plain_L2": {1: 2.00, 2: 2.01, 3: 2.02},
                     "plain_L4": {1: 1.90, 2: 1.91, 3: 1.925}},
                    looped={"loop": ("plain_L2", "plain_L4")})[0]
    fractions, details = gap_fractions(clear, clear.variants[0])
    assert not details["unreliable"]
    p, lo, d = np.array([2.0, 2.01, 2.02]), np.array([1.95, 1.96, 1.97]), np.array(
        [1.90, 1.91, 1.925])
    assert details["closed"]["estimate"] == pytest.approx((p.mean() - lo.mean())
                                                          / (p.mean() - d.mean()))
    assert [s for s, _ in fractions] == [1, 2, 3]
    tie = section({"loop": {1: 1.95, 2: 1.96, 3: 1.97},
                   "plain_L2": {1: 2.00, 2: 1.90, 3: 2.02},
                   "plain_L4": {1: 1.95, 2: 2.01, 3: 1.94}},
                  looped={"loop": ("plain_L2", "plain_L4")})[0]
    assert gap_fractions(tie, tie.variants[0])[1]["unreliable"]


# ---------------------------------------------------------------------------------------------
# Adaptive seeding end to end


def adaptive_file(tmp_path, width: float):
    # Token data: the validation loss differs between seeds (a tiny task run's accuracy is 0
    # for every seed, which makes every interval zero wide).
    data = tmp_path / "data"
    if not data.exists():
        write_char_data(data)
    base = {"dataset": "shakespeare_char", "data_dir": str(data), "block_size": 8,
            "n_head": 2, "n_embd": 16, "batch_size": 4, "eval_iters": 2, "eval_interval": 2}
    return write_experiment(tmp_path / "a.py", (
        f'name = "a"\nbase = {base!r}\nseeds = [1, 2]\nbudget = {{"iters": 2}}\n'
        f'evaluation = {{"samples": 0}}\n'
        f'variants = [{{"name": "plain_L1", "n_layer": 1}}, {{"name": "plain_L2", "n_layer": 2}}]\n'
        f'adaptive_seeds = {{"target_width": {width}, "max_seeds": 4, "max_runs": 3}}\n'))


def test_adaptive_seeding_adds_seeds_until_the_run_budget_is_spent(tmp_path):
    out = tmp_path / "out"
    assert main([str(adaptive_file(tmp_path, 1e-12)), "--out", str(out), "--jobs", "2"]) == 0
    # Round 1 adds seed 3 to both variants (2 runs); a second pair of runs would pass max_runs
    # (3), and a pair is only ever extended whole.
    expected = {f"main/plain_L{n}-s{s}" for n in (1, 2) for s in (1, 2, 3)}
    assert set(load_results(out)) == expected
    plan = json.loads((out / "experiment.json").read_text())
    seeds = {v["name"]: v["seeds"] for v in plan["sections"][0]["variants"]}
    assert seeds == {"plain_L1": [1, 2, 3], "plain_L2": [1, 2, 3]}
    assert plan["runs_total"] == 6
    text = (out / "report" / "report.md").read_text()
    assert "Adaptive seeding" in text and "`plain_L1` [3]" in text
    # Rerunning reuses every run: the same decisions are made from the same results.
    lines = len((out / RESULTS_FILE).read_text().splitlines())
    assert main([str(adaptive_file(tmp_path, 1e-12)), "--out", str(out), "--jobs", "2"]) == 0
    assert len((out / RESULTS_FILE).read_text().splitlines()) == lines
    # Intervals narrow enough: no seed is added, and the finished runs are reused.
    wide = str(adaptive_file(tmp_path, 1e9))
    assert main([wide, "--out", str(out), "--jobs", "2"]) == 0
    assert len((out / RESULTS_FILE).read_text().splitlines()) == lines
    assert "no seed needed adding" in (out / "report" / "report.md").read_text()
    # --force reruns every planned run once and adopts no result.json left on disk.
    assert main([wide, "--out", str(out), "--jobs", "2", "--force"]) == 0
    records = [json.loads(x) for x in (out / RESULTS_FILE).read_text().splitlines()]
    assert sorted(r["run_id"] for r in records[lines:]) == sorted(
        f"main/plain_L{n}-s{s}" for n in (1, 2) for s in (1, 2))


@pytest.mark.parametrize("text, fragment", [
    ('adaptive_seeds = {"target_width": 0.1, "max_seeds": 5}', "needs 'max_runs'"),
    ('adaptive_seeds = {"target_width": -1, "max_seeds": 5, "max_runs": 2}', "target_width"),
    ('adaptive_seeds = {"target_width": 0.1, "max_seeds": 1, "max_runs": 2}', "max_seeds"),
    ('adaptive_seeds = {"target_wdth": 0.1, "max_seeds": 5, "max_runs": 2}', "target_width"),
    ('solve_threshold = 1.5', "solve_threshold"),
])
def test_bad_statistics_keys_are_one_clear_error(tmp_path, capsys, text, fragment):
    path = write_experiment(tmp_path / "e.py", (
        f'name = "t"\nbase = {TASK_BASE!r}\nvariants = [{{"name": "a", "n_layer": 1}}]\n'
        f'seeds = [1, 2]\nbudget = {{"iters": 2}}\n{text}\n'))
    assert main([str(path), "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error:") and fragment in err
    assert not (tmp_path / "o").exists()
