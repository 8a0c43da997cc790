"""Tests for the cross-model test-time depth protocol: the `cross_model_depth` key of experiment
files, its expansion by the planner, the verdicts on hand-made numbers, and a tiny experiment
end to end whose report holds the protocol's figure, table and verdicts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from blockloop.experiment import (
    ExperimentError,
    add_baselines,
    load_results,
    main,
    plan_experiment,
    read_experiment_file,
)
from blockloop.experiment.depth_protocol import (
    DepthGrid,
    compare,
    grid_from_section,
    section_markdown,
    summary_sentence,
    verdicts,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TASK_BASE = {"dataset": "phop", "phop_n": 8, "phop_hops": 1, "block_size": 9, "n_head": 2,
             "n_embd": 16, "batch_size": 8, "gradient_accumulation_steps": 1}
LOOP = '{"name": "loop", "n_layer": 1, "loop_center_idx": 0, "max_loops": 3}'


def experiment(tmp_path: Path, variants: str, extra: str, name: str = "exp.py") -> Path:
    path = tmp_path / name
    path.write_text(f'name = "t"\nbase = {TASK_BASE!r}\nvariants = {variants}\nseeds = [1, 2]\n'
                    f'budget = {{"iters": 2}}\n{extra}\n')
    return path


# ---------------------------------------------------------------------------------------------
# The experiment-file key


@pytest.mark.parametrize("variants, value, fragment", [
    (f"[{LOOP}]", '[1, 2]', "'cross_model_depth' must be a dict"),
    (f"[{LOOP}]", '{"variant": "loop", "train_loop": [1, 2]}',
     "unknown key 'train_loop' in 'cross_model_depth'; did you mean 'train_loops'"),
    (f"[{LOOP}]", '{"variant": "lop", "train_loops": [1, 2]}',
     "'cross_model_depth.variant' must name a variant of the section (loop), got 'lop'"),
    (f"[{LOOP}]", '{"variant": "loop"}', "'cross_model_depth.train_loops' is missing"),
    (f"[{LOOP}]", '{"variant": "loop", "train_loops": [0, 2]}',
     "'cross_model_depth.train_loops' must be a list of integers >= 1"),
    (f"[{LOOP}]", '{"variant": "loop", "train_loops": [2, 2]}', "at least two distinct"),
    (f"[{LOOP}]", '{"variant": "loop", "train_loops": [3]}', "at least two distinct"),
    ('[{"name": "plain", "n_layer": 2}]', '{"variant": "plain", "train_loops": [1, 2]}',
     "variant 'plain' is not looped"),
    ('[{"name": "g", "n_layer": 3, "loop_groups": [[0, 0], [2, 2]], "loop_counts": [2, 3]}]',
     '{"variant": "g", "train_loops": [1, 2]}', "variant 'g' sets 'loop_counts'"),
])
def test_bad_requests_name_the_file_and_the_key(tmp_path, variants, value, fragment):
    path = experiment(tmp_path, variants, f"cross_model_depth = {value}", name="bad_depth.py")
    with pytest.raises(ExperimentError) as info:
        read_experiment_file(path)
    assert fragment in str(info.value)
    assert "bad_depth.py" in str(info.value)


def test_request_is_a_section_key_with_top_level_default(tmp_path):
    path = tmp_path / "e.py"
    path.write_text(
        f'name = "t"\nbase = {TASK_BASE!r}\nseeds = [1]\nbudget = {{"iters": 2}}\n'
        f'variants = [{LOOP}]\n'
        'cross_model_depth = {"variant": "loop", "train_loops": [6, 1, 3]}\n'
        'sections = [{"name": "a"}, {"name": "b", "cross_model_depth": None}]\n')
    a, b = read_experiment_file(path).sections
    assert a.cross_model_depth == {"variant": "loop", "train_loops": [1, 3, 6]}
    assert b.cross_model_depth is None


# ---------------------------------------------------------------------------------------------
# Planning


def test_planner_trains_the_variant_at_every_count_reusing_equal_variants(tmp_path):
    # `same_as_r2` is the looped block at two iterations under another name: it stands for r=2.
    # `loop_r1` is taken by a different model, so the r=1 variant gets another name.
    variants = (f'[{LOOP}, {{"name": "same_as_r2", "n_layer": 1, "loop_center_idx": 0, '
                f'"max_loops": 2}}, {{"name": "loop_r1", "n_layer": 2}}]')
    path = experiment(tmp_path, variants, 'baselines = False\n'
                      'cross_model_depth = {"variant": "loop", "train_loops": [1, 2, 3, 6]}')
    exp = read_experiment_file(path)
    names = [v.name for v in add_baselines(exp.sections[0])]
    assert names == ["loop", "same_as_r2", "loop_r1", "loop_r1_x", "loop_r6"]
    runs, info = plan_experiment(exp, tmp_path / "out")
    trained = info["sections"][0]["cross_model_depth"]["trained"]
    assert trained == [{"train_loops": 1, "variant": "loop_r1_x"},
                       {"train_loops": 2, "variant": "same_as_r2"},
                       {"train_loops": 3, "variant": "loop"},
                       {"train_loops": 6, "variant": "loop_r6"}]
    assert len(runs) == 2 * 5
    by_variant = {r.variant: r for r in runs}
    for entry in trained:
        run = by_variant[entry["variant"]]
        assert run.values["max_loops"] == entry["train_loops"]
        assert run.values["n_layer"] == 1 and run.values["loop_center_idx"] == 0
        # Every count of the protocol is evaluated, beyond the default curve of a model
        # trained at 1 (1, 2, 4, 8, 16).
        assert {1, 2, 3, 6} <= set(run.evaluation["test_loops"])
    assert by_variant["loop_r1"].evaluation["test_loops"] == [1, 2, 4, 8, 16]


def test_only_the_named_variant_gets_plain_references(tmp_path):
    # The protocol's own variants are compared with each other; references for them would cost
    # runs of up to max(train_loops) unique blocks for a comparison nobody asked for.
    path = experiment(tmp_path, f"[{LOOP}]",
                      'cross_model_depth = {"variant": "loop", "train_loops": [2, 3, 6]}')
    variants = {v.name: v for v in add_baselines(read_experiment_file(path).sections[0])}
    assert set(variants) == {"loop", "loop_r2", "loop_r6", "plain_L1", "plain_L3"}
    assert variants["loop"].references == {"param": "plain_L1", "depth": "plain_L3"}
    assert variants["loop_r2"].references == {} and variants["loop_r6"].references == {}


# ---------------------------------------------------------------------------------------------
# Verdicts on hand-made numbers (seed -> value)


def grid(values: dict, higher_is_better: bool = False) -> DepthGrid:
    counts = sorted({r for r, _ in values} | {x for _, x in values})
    return DepthGrid(train_loops=counts, variants={r: f"loop_r{r}" for r in counts},
                     values=values, runs={r: {"ok": [1, 2, 3, 4], "failed": 0, "missing": 0}
                                          for r in counts},
                     higher_is_better=higher_is_better)


TRAINED_AT_2 = {1: 1.50, 2: 1.60, 3: 1.45, 4: 1.55}
CASES = {
    "beats": {1: 1.00, 2: 1.10, 3: 0.90, 4: 1.05},  # 0.5 lower at every seed
    "ties": {1: 1.40, 2: 1.75, 3: 1.35, 4: 1.60},  # -0.1, +0.15, -0.1, +0.05
    "loses": {1: 1.81, 2: 1.89, 3: 1.75, 4: 1.86},  # about 0.3 higher at every seed
}


@pytest.mark.parametrize("expected", ["beats", "ties", "loses"])
def test_verdict_beats_ties_loses(expected):
    g = grid({(1, 2): CASES[expected], (2, 2): TRAINED_AT_2})
    v = compare(g, 1, 2)
    assert v.outcome == expected
    assert v.seeds == [1, 2, 3, 4] and v.test["n"] == 4
    assert v.test["significant"] == (expected != "ties")
    # For an accuracy higher is better: the same numbers reverse the verdict.
    flipped = {"beats": "loses", "loses": "beats", "ties": "ties"}[expected]
    assert compare(grid(g.values, higher_is_better=True), 1, 2).outcome == flipped


def test_verdict_pairs_by_seed_not_by_position():
    # A constant 0.01 gain at every seed, hidden in a large spread between seeds: significant
    # only when paired. Insertion order differs and seed 9 has no partner.
    trained = {4: 4.0, 3: 3.0, 2: 2.0, 1: 1.0}
    run_longer = {1: 0.99, 2: 1.99, 3: 2.99, 4: 3.99, 9: 0.0}
    v = compare(grid({(1, 2): run_longer, (2, 2): trained}), 1, 2)
    assert v.outcome == "beats" and v.seeds == [1, 2, 3, 4]
    assert v.test["mean_diff"] == pytest.approx(-0.01)


def test_non_finite_seeds_are_left_out_and_named():
    g = grid({(1, 2): {1: math.nan, 2: 1.0, 3: 1.1}, (2, 2): {1: 1.5, 2: 1.6, 3: math.nan}})
    v = compare(g, 1, 2)
    assert v.outcome == "undetermined" and v.seeds == [2] and v.excluded == [1, 3]
    assert "cannot be compared" in v.phrase()


def test_summary_states_only_significant_findings():
    g = grid({(1, 2): CASES["beats"], (2, 2): TRAINED_AT_2, (1, 3): CASES["ties"],
              (2, 3): CASES["loses"], (3, 3): TRAINED_AT_2})
    found = {(v.short, v.long): v.outcome for v in verdicts(g)}
    assert found == {(1, 2): "beats", (1, 3): "ties", (2, 3): "loses"}
    text = summary_sentence(verdicts(g))
    assert "beats the model trained at r' for (r, r') = (1, 2)" in text
    assert "loses to the model trained at r' for (r, r') = (2, 3)" in text
    assert "(1, 3)" not in text
    assert summary_sentence([compare(g, 1, 3)]).startswith("No model run beyond")


def fake_section(tmp_path: Path) -> SimpleNamespace:
    """A report.SectionData stand-in: r=1 evaluated at 1 and 2 with a diverged seed, r=2's runs
    all failed, r=3 never run."""
    def rec(seed, rows):
        return {"seed": seed, "loop_scaling": [{"num_loops": n, "loss": loss} for n, loss in rows]}
    trained = [{"train_loops": r, "variant": f"v{r}"} for r in (1, 2, 3)]
    return SimpleNamespace(
        name="s", is_task=False, metric_label="validation loss", loss_top=lambda: 3.0,
        info={"cross_model_depth": {"variant": "v1", "train_loops": [1, 2, 3],
                                    "trained": trained}},
        by_variant={"v1": [rec(1, [(1, 2.0), (2, None)]), rec(2, [(1, 2.1), (2, 9.0)])],
                    "v2": [], "v3": []},
        failed={"v1": [], "v2": [{"seed": 1}, {"seed": 2}], "v3": []},
        missing={"v1": [], "v2": [], "v3": [{"run_id": "s/v3-s1"}]})


def test_missing_failed_and_diverged_runs_are_marked_not_fatal(tmp_path):
    sec = fake_section(tmp_path)
    g = grid_from_section(sec)
    assert math.isnan(g.at(1, 2)[1]) and g.at(1, 2)[2] == 9.0
    text = "\n".join(section_markdown(sec, tmp_path))
    assert "| 1 (`v1`) | **2.0500** | 9.0000 (1 of 2 seeds non-finite) | not runnable | 1, 2 |" in text
    assert "| 2 (`v2`) | — | — | — | none (2 failed) |" in text
    assert "| 3 (`v3`) | — | — | — | none (1 not run) |" in text
    assert text.count("cannot be compared") == 3
    assert (tmp_path / "s_cross_model_depth.png").read_bytes()[:8] == PNG_MAGIC
    assert grid_from_section(SimpleNamespace(info={})) is None


# ---------------------------------------------------------------------------------------------
# End to end


def test_tiny_protocol_experiment_reports_figure_table_and_verdicts(tmp_path, monkeypatch):
    base = {**TASK_BASE, "task_eval_size": 32, "eval_interval": 2, "eval_iters": 1,
            "device": "cpu", "compile": False, "log_interval": 1}
    path = tmp_path / "depth.py"
    path.write_text(
        f'name = "d"\nbase = {base!r}\nseeds = [1, 2]\nbudget = {{"iters": 2}}\n'
        f'baselines = False\nvariants = [{LOOP}]\n'
        'evaluation = {"test_loops": [1], "exit_thresholds": [0.1], "hops": [1]}\n'
        'cross_model_depth = {"variant": "loop", "train_loops": [1, 3]}\n')
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out), "--jobs", "2"]) == 0
    records = load_results(out)
    assert set(records) == {"main/loop-s1", "main/loop-s2", "main/loop_r1-s1", "main/loop_r1-s2"}
    # The model trained at 1 is evaluated at 3, a count its own curve would not include.
    counts = [row["num_loops"] for row in records["main/loop_r1-s1"]["loop_scaling"]]
    assert 3 in counts and records["main/loop_r1-s1"]["max_loops"] == 1
    text = (out / "report" / "report.md").read_text()
    assert "### Cross-model test-time depth" in text
    assert "| trained at r (variant) | run at 1 | run at 3 | seeds |" in text
    assert "| 1 (`loop_r1`) | **" in text and "| 3 (`loop`) | " in text
    assert "| 1 at 3 | 3 at 3 |" in text and "**Summary:**" in text
    assert "](main_cross_model_depth.png)" in text
    png = out / "report" / "main_cross_model_depth.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    plan = json.loads((out / "experiment.json").read_text())
    assert plan["sections"][0]["cross_model_depth"]["train_loops"] == [1, 3]
