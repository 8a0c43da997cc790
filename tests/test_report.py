"""Tests for blockloop.experiment.report on a synthetic experiment directory (no training): the
numbers in the tables, the recurrence-equivalence fractions, failures and stale records, and the
figures."""

from __future__ import annotations

import json
import math

import matplotlib
from scipy import stats as scipy_stats
import pytest

from blockloop.experiment import RESULTS_FILE, plan_experiment, read_experiment_file
from blockloop.experiment.report import SectionData, gap_fractions, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMMON = {"n_head": 2, "n_embd": 16, "gradient_accumulation_steps": 1, "batch_size": 4}
LM_BASE = {**COMMON, "dataset": "shakespeare_char", "block_size": 16}
TASK_BASE = {**COMMON, "dataset": "phop", "phop_n": 8, "phop_hops": 2, "block_size": 9}
LOOP_LM = {"name": "loop", "n_layer": 2, "loop_center_idx": 1, "max_loops": 3}
LOOP_TASK = {"name": "loop1", "n_layer": 1, "loop_center_idx": 0, "max_loops": 4}

# Best validation loss per (variant, seed) in the language-model section.
LM_LOSS = {("plain_L2", 1): 2.0, ("plain_L2", 2): 2.2, ("plain_L4", 1): 1.6,
           ("plain_L4", 2): 1.8, ("loop", 1): 1.8, ("loop", 2): 1.96}
TASK_ACC = {"plain_L1": 0.30, "plain_L4": 0.90, "loop1": 0.75}
FLOORS = {"uniform": 0.25, "majority": 0.3, "copy_last": 0.41, "anything_but_last": 0.2}


def experiment_text() -> str:
    return f'''
name = "synthetic"
description = "made up numbers"
budget = {{"iters": 20}}
sections = [
    {{"name": "lm", "base": {LM_BASE!r}, "seeds": [1, 2],
      "variants": [{{"name": "plain_L2", "n_layer": 2}}, {LOOP_LM!r},
                   {{"name": "broken", "n_layer": 3}}]}},
    {{"name": "task", "base": {TASK_BASE!r}, "seeds": [1],
      "variants": [{{"name": "plain_L1", "n_layer": 1}}, {LOOP_TASK!r}]}},
]
'''


def metrics_lines(final: float, task: bool, iters: int = 20) -> list:
    key = "val_accuracy" if task else "val_loss"
    lines = []
    for it in range(0, iters + 1, 10):
        frac = it / iters
        value = (final * frac) if task else (4.0 + (final - 4.0) * frac)
        lines.append({"iter": it, "kind": "eval", "val_loss": 4.0 - frac, key: value})
        if it < iters:
            lines += [{"iter": i, "kind": "train", "loss": 3.0, "train_flops": 1e6 * (i + 1)}
                      for i in range(it, it + 10)]
    return lines


def looped_extras(task: bool, trained: int, good: float) -> dict:
    key = "accuracy" if task else "loss"
    scaling = []
    for n in sorted({1, 2, 4, 8, 16} | set(range(1, 2 * trained + 1))):
        # Worse away from the trained count; far out the loss exceeds log(vocab) (clipped).
        value = good - 0.05 * abs(n - trained) if task else good + (0.4 * abs(n - trained)
                                                                   if n <= 8 else 7.0)
        scaling.append({"num_loops": n, key: value, "mean_iterations": float(n)})
    sweep = [{"threshold": th, "num_loops": 2 * trained, key: good, "mean_iterations": m}
             for th, m in ((0.1, 2.0), (0.01, 3.5), (0.001, 2.0 * trained))]
    return {"looped": True, "max_loops": trained, "loop_scaling": scaling, "exit_sweep": sweep,
            "exit_default": {"threshold": 0.001, key: good, "mean_iterations": float(trained)}}


@pytest.fixture
def synthetic(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(experiment_text())
    out = tmp_path / "out"
    runs, info = plan_experiment(read_experiment_file(path), out)
    info.update(out_dir=str(out), jobs=2, threads_per_run=1, cpus=2, started_at="now",
                runs_total=len(runs), runs_skipped=0, runs_to_do=len(runs), finished=True,
                wall_time_s=123.0)
    out.mkdir()
    (out / "experiment.json").write_text(json.dumps(info))
    records = []
    for run in runs:
        run.run_dir.mkdir(parents=True)
        base = {"run_id": run.run_id, "section": run.section, "variant": run.variant,
                "seed": run.seed, "role": run.role, "spec_hash": run.spec_hash}
        if run.variant == "broken":
            if run.seed == 1:
                records.append({**base, "status": "failed",
                                "error": "RuntimeError: boom\nsecond line of the error"})
            else:
                # A leftover from an earlier config: must not count as this run's result.
                records.append({**base, "spec_hash": "0" * 16, "status": "ok",
                                "best_val_loss": 0.1})
            continue
        task = run.section == "task"
        depth = {"plain_L1": 1, "plain_L2": 2, "plain_L4": 4, "loop": 4, "loop1": 4}[run.variant]
        rec = {**base, "status": "ok", "iter_num": 20, "n_params": 1000 * depth,
               "effective_depth": depth, "train_flops": 2e7, "tokens_per_sec": 5000.0,
               "wall_time_s": 10.0, "vocab_size": 11, "looped": run.variant.startswith("loop"),
               "max_loops": 1}
        if task:
            acc = TASK_ACC[run.variant]
            rec.update(final_val_accuracy=acc, best_val_accuracy=acc, final_val_loss=1.0,
                       best_val_loss=1.0, floors=FLOORS, trained_hops=2,
                       hops=[{"hops": p, "num_loops": n, "accuracy": acc / p, "floors": FLOORS}
                             for p in (1, 2, 3, 4) for n in ((4, 8) if rec["looped"] else (1,))])
            final = acc
        else:
            final = LM_LOSS[(run.variant, run.seed)]
            rec.update(best_val_loss=final, final_val_loss=final + 0.01,
                       samples=["First Citizen:\nSpeak", "a ``` fence"])
        if rec["looped"]:
            rec.update(looped_extras(task, 4 if task else 3, final))
        records.append(rec)
        (run.run_dir / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in metrics_lines(final, task)))
    (out / RESULTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    return out, info


def test_report_tables_and_failures(synthetic):
    out, _ = synthetic
    backend = matplotlib.get_backend()
    text = write_report(out).read_text()
    assert matplotlib.get_backend() == backend  # the report never switches the caller's backend
    assert "# Experiment `synthetic`" in text and "made up numbers" in text
    # Mean with its 95% Student-t interval over the two seeds (2.0 and 2.2: sd sqrt(0.02)).
    row = next(ln for ln in text.splitlines() if ln.startswith("| plain_L2 |"))
    half = scipy_stats.t.ppf(0.975, 1) * math.sqrt(0.02) / math.sqrt(2)
    assert f"2.1000 [{2.1 - half:.4f}, {2.1 + half:.4f}]" in row
    assert "| plain_L4 | reference (added) |" in text
    loop_row = next(ln for ln in text.splitlines() if ln.startswith("| loop |"))
    assert "3.00 ± 0.00 of 3" in loop_row  # iterations used under automatic exit
    # The failed run is reported with its error; the stale record is not used as a result.
    assert "FAILED" in text and "RuntimeError: boom" in text and "second line" in text
    assert "Not run yet: lm/broken-s2" in text
    assert "0.1000" not in text
    # Floors beside task accuracies, and the one-seed section says so.
    assert "best floor **0.410**" in text
    assert "Seeds: only 1" in text
    # Samples sit in fenced blocks, so a fence inside a sample must not close the block.
    assert "First Citizen:" in text
    fence_lines = [ln for ln in text.splitlines() if "fence" in ln]
    assert fence_lines and all("```" not in ln for ln in fence_lines)


def test_recurrence_equivalence_fractions(synthetic):
    out, info = synthetic
    write_report(out)
    from blockloop.experiment import load_results

    records = load_results(out)
    lm = SectionData(info["sections"][0], info["runs"], records, out)
    loop = next(v for v in lm.variants if v["name"] == "loop")
    fractions, details = gap_fractions(lm, loop)
    # Seed by seed: (loop - param) / (depth - param).
    assert dict(fractions) == pytest.approx({1: (1.8 - 2.0) / (1.6 - 2.0),
                                             2: (1.96 - 2.2) / (1.8 - 2.2)})
    assert (details["param"], details["depth"]) == ("plain_L2", "plain_L4")
    task = SectionData(info["sections"][1], info["runs"], records, out)
    loop1 = next(v for v in task.variants if v["name"] == "loop1")
    fractions, details = gap_fractions(task, loop1)
    assert dict(fractions) == pytest.approx({1: (0.75 - 0.30) / (0.90 - 0.30)})
    text = (out / "report" / "report.md").read_text()
    # The table's estimate is the ratio of the seed means: (2.1 - 1.88) / (2.1 - 1.7) = 0.55,
    # with a bootstrap interval; the one-seed task section has no interval.
    assert details["closed"]["estimate"] == pytest.approx(0.75)
    lm_details = gap_fractions(lm, loop)[1]
    assert lm_details["closed"]["estimate"] == pytest.approx((2.1 - 1.88) / (2.1 - 1.7))
    assert "| 0.55 [" in text and "| 0.75 (no interval) |" in text


def test_every_figure_is_written_and_linked(synthetic):
    out, _ = synthetic
    from matplotlib.image import imread

    text = write_report(out).read_text()
    expected = {f"{sec}_{kind}.png" for sec in ("lm", "task") for kind in
                ("training_curves", "loop_scaling", "exit_sweep", "recurrence_equivalence")}
    expected.add("task_accuracy_vs_hops.png")
    written = {p.name for p in (out / "report").glob("*.png")}
    assert written == expected
    for name in expected:
        path = out / "report" / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert imread(path).shape[0] > 100
        assert f"]({name})" in text
    # Each figure is followed by how to read it.
    assert text.count("*How to read it:*") == len(expected)


def test_report_with_nothing_finished(synthetic):
    out, _ = synthetic
    (out / RESULTS_FILE).write_text("")
    text = write_report(out).read_text()
    assert "not run" in text
    assert not list((out / "report").glob("*.png"))


def test_results_with_the_old_row_keys_are_still_drawn(synthetic):
    # Results from before the keys were unified ("loops" in loop-scaling and hop rows,
    # "max_loops" in exit-sweep rows) can be kept with --keep_other_code; the report reads them.
    out, _ = synthetic
    renames = {"loop_scaling": "loops", "hops": "loops", "exit_sweep": "max_loops"}
    lines = []
    for line in (out / RESULTS_FILE).read_text().splitlines():
        rec = json.loads(line)
        for key, old in renames.items():
            rec[key] = [{(old if k == "num_loops" else k): v for k, v in row.items()}
                        for row in rec.get(key) or []]
        lines.append(json.dumps(rec))
    (out / RESULTS_FILE).write_text("\n".join(lines) + "\n")
    new = write_report(out).read_text()
    assert "at most 8 iterations" in new  # the exit sweep's cap, read from "max_loops"
    written = {p.name for p in (out / "report").glob("*.png")}
    assert {"lm_loop_scaling.png", "task_accuracy_vs_hops.png", "lm_exit_sweep.png"} <= written


def test_diverged_loop_scaling_points_are_marked(synthetic):
    # A loop-scaling loss that was not finite is stored as None; the figure marks it instead of
    # dropping it silently, and its caption says so.
    out, _ = synthetic
    lines = []
    for line in (out / RESULTS_FILE).read_text().splitlines():
        rec = json.loads(line)
        for row in rec.get("loop_scaling") or []:
            if row["num_loops"] == 16 and "loss" in row:
                row["loss"] = None
        lines.append(json.dumps(rec))
    (out / RESULTS_FILE).write_text("\n".join(lines) + "\n")
    text = write_report(out).read_text()
    assert "diverged (non-finite loss)" in text
