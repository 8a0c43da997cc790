"""Loop schedules (`loop_schedule`): the counts against hand-computed values, the run's mean
against a step-by-step sum, training runs that follow the schedule (logged counts, FLOPs as run,
exact resume), configuration errors, and the shipped experiment planned at equal FLOPs."""

import json
from pathlib import Path

import pytest
import torch

import blockloop.train as train_module
from blockloop.config import ConfigError, build_configs, help_text, parse_train_args
from blockloop.experiment import plan_experiment, read_experiment_file
from blockloop.looping import (
    mean_scheduled_loops,
    schedule_steps,
    scheduled_counts,
    step_num_loops,
    switch_step,
)
from blockloop.model import GPT, GPTConfig
from tests.conftest import read_metrics, run, tiny_args, write_token_dataset

REPO = Path(__file__).resolve().parent.parent
SCHEDULES = REPO / "config" / "experiment_schedules.py"
ONE_GROUP = {"n_layer": 2, "loop_center_idx": 1, "max_loops": 3}
TWO_GROUPS = {"n_layer": 4, "loop_groups": [[1, 2], [3, 3]], "loop_counts": [4, 2]}


def config(schedule, fraction=0.5, loop=ONE_GROUP, **extra):
    return GPTConfig(n_head=2, n_embd=16, vocab_size=11, block_size=16, loop_schedule=schedule,
                     loop_schedule_fraction=fraction, **loop, **extra)


def per_step(cfg, max_iters):
    return [scheduled_counts(cfg, i, max_iters) for i in range(max_iters)]


# ----------------------------------------------------------------------------------------------
# The schedule itself


def test_constant_schedule_is_the_trained_counts_at_every_step():
    assert per_step(config("constant"), 5) == [[3]] * 5
    assert per_step(config("constant", loop=TWO_GROUPS), 3) == [[4, 2]] * 3
    # Today's behaviour: a fixed count leaves num_loops to the model's default.
    assert step_num_loops(config("constant"), 2, 5, [torch.Generator()]) is None


@pytest.mark.parametrize("fraction,max_iters,switch", [
    (0.5, 10, 5), (0.3, 10, 3),  # 0.3 is 3/10, not the binary float just below it
    (0.25, 10, 3),  # 2.5 rounded half up
    (0.24, 10, 2), (0.9, 4, 4), (0.01, 10, 0),  # 3.6 rounds to 4: no step at T
])
def test_progressive_runs_one_iteration_until_the_switch_step(fraction, max_iters, switch):
    cfg = config("progressive", fraction)
    assert switch_step(cfg, max_iters) == switch
    assert per_step(cfg, max_iters) == [[1]] * switch + [[3]] * (max_iters - switch)
    two = config("progressive", fraction, loop=TWO_GROUPS)
    assert per_step(two, max_iters) == [[1, 1]] * switch + [[4, 2]] * (max_iters - switch)


def test_curriculum_ramps_the_count_per_group():
    # T = 3, f = 0.5, N = 10: m = 1 + 2 i / 5 = 1, 1.4, 1.8, 2.2, 2.6, then 3.
    assert per_step(config("curriculum"), 10) == [[1], [1], [2], [2], [3]] + [[3]] * 5
    # T = (4, 2), N = 8, ramp 4 steps: m = (1, 1), (1.75, 1.25), (2.5, 1.5), (3.25, 1.75), then
    # (4, 2); halves round up.
    assert per_step(config("curriculum", loop=TWO_GROUPS), 8) == (
        [[1, 1], [2, 1], [3, 2], [3, 2]] + [[4, 2]] * 4)
    # Past the end of the run the trained counts stay.
    assert scheduled_counts(config("curriculum", loop=TWO_GROUPS), 50, 8) == [4, 2]


@pytest.mark.parametrize("schedule", ["constant", "progressive", "curriculum"])
@pytest.mark.parametrize("loop", [ONE_GROUP, TWO_GROUPS,
                                  {"n_layer": 3, "loop_groups": [[0, 0], [2, 2]],
                                   "loop_counts": [1, 7]}])
def test_steps_and_mean_match_a_step_by_step_sum(schedule, loop):
    fractions = (0.1, 0.25, 0.3, 0.5, 2 / 3, 0.77) + ((1.0,) if schedule != "progressive" else ())
    for fraction in fractions:
        for max_iters in (1, 2, 3, 7, 10, 33, 100):
            cfg = config(schedule, fraction, loop=loop)
            brute = per_step(cfg, max_iters)
            expanded = [counts for counts, n in schedule_steps(cfg, max_iters) for _ in range(n)]
            assert expanded == brute, (fraction, max_iters)
            means = [sum(c[g] for c in brute) / max_iters for g in range(len(brute[0]))]
            assert mean_scheduled_loops(cfg, max_iters) == pytest.approx(means, rel=1e-12)


def test_sampled_counts_draw_around_the_scheduled_mean():
    cfg = config("curriculum", 0.5, loop_sampling="poisson_lognormal")
    gen = torch.Generator().manual_seed(0)
    # Step 0 of a curriculum has mean 1: every sampler returns 1.
    assert {step_num_loops(cfg, 0, 100, [gen]) for _ in range(50)} == {1}
    late = [step_num_loops(cfg, 80, 100, [gen]) for _ in range(3000)]
    assert sum(late) / len(late) == pytest.approx(3, rel=0.05)
    assert len(set(late)) > 2


# ----------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("flags,fragment", [
    (["--loop_schedule=progressive"], "loop_schedule='progressive'.*loop_center_idx"),
    (["--loop_schedule=linear", "--loop_center_idx=1"], "loop_schedule='linear'"),
    (["--loop_schedule=curriculum", "--loop_center_idx=1", "--loop_schedule_fraction=0"],
     r"loop_schedule_fraction=0.0: must be in \(0, 1\]"),
    (["--loop_schedule_fraction=1.5", "--loop_center_idx=1"], "loop_schedule_fraction=1.5"),
    (["--loop_schedule=progressive", "--loop_center_idx=1", "--loop_schedule_fraction=1"],
     "would never train at it"),
    (["--loop_schedule_fraction=nan", "--loop_center_idx=1"], "loop_schedule_fraction"),
])
def test_bad_schedule_keys_are_one_line_errors(flags, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        parse_train_args(flags)
    assert "\n" not in str(err.value)


def test_schedule_keys_are_documented_in_help_and_readme():
    assert "--loop_schedule='constant'" in help_text()
    readme = (REPO / "README.md").read_text()
    assert "`loop_schedule`" in readme and "`loop_schedule_fraction`" in readme


# ----------------------------------------------------------------------------------------------
# Training with a schedule


@pytest.fixture
def data(tmp_path):
    return write_token_dataset(tmp_path / "data")


def train_records(out):
    return [r for r in read_metrics(out) if r["kind"] == "train"]


@pytest.mark.parametrize("schedule,loop", [
    ("progressive", ("--loop_center_idx=1", "--max_loops=3")),
    ("curriculum", ("--n_layer=3", "--loop_groups=[[0,0],[2,2]]", "--loop_counts=3,2",
                    "--loop_input_injection=concat")),
])
def test_training_follows_the_schedule_and_counts_flops_as_run(data, tmp_path, one_thread,
                                                               schedule, loop):
    out = tmp_path / "out"
    result = run(tiny_args(data, out, "--max_iters=10", f"--loop_schedule={schedule}",
                           "--loop_schedule_fraction=0.5", *loop))
    trains = train_records(out)
    cfg = GPTConfig(**json.loads((out / "config.json").read_text())["model"])
    expected = per_step(cfg, 10)
    assert [r["group_loops"] for r in trains] == expected
    assert len({tuple(c) for c in expected}) >= 2  # the schedule does change the count
    assert [r["loops"] for r in trains[:2]] == [1.0, 1.0]
    # Training FLOPs: each step's count, as train.py counts a step (tokens x FLOPs per token).
    model = GPT(cfg)
    tokens = 4 * 16 * 2  # batch_size x block_size x gradient_accumulation_steps
    total = 0.0
    for r, counts in zip(trains, expected):
        total += model.flops_per_token(counts) * tokens
        assert r["train_flops"] == pytest.approx(total, rel=1e-12)
    assert result.train_flops == pytest.approx(total, rel=1e-12)
    assert total < 10 * model.flops_per_token() * tokens  # cheaper than the full count


def interrupt_at(monkeypatch, stop_after: int):
    """Make the run stop after step `stop_after` as a SIGINT would (the stop flag the handler
    sets), so it saves last.pt and exits with its max_iters unchanged."""
    real = train_module.train_step

    def step(t, iter_num):
        if iter_num == stop_after:
            t.stop.signal_name = "SIGINT"
        return real(t, iter_num)

    monkeypatch.setattr(train_module, "train_step", step)


@pytest.mark.parametrize("extra", [
    ("--loop_schedule=progressive",),
    ("--loop_schedule=curriculum", "--loop_schedule_fraction=0.8",
     "--loop_sampling=poisson_lognormal", "--max_loops=4"),
])
def test_an_interrupted_run_resumes_on_the_same_schedule(data, tmp_path, monkeypatch, one_thread,
                                                         extra):
    args = ("--max_iters=12", "--loop_center_idx=1", "--max_loops=3", *extra)
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(tiny_args(data, straight, *args))
    with monkeypatch.context() as m:
        interrupt_at(m, 4)
        stopped = run(tiny_args(data, split, *args))
    assert stopped.stopped_by == "SIGINT" and stopped.iter_num == 5
    assert max(r["iter"] for r in train_records(split)) == 4
    run(tiny_args(data, split, *args, "--init_from=resume"))
    keys = ("iter", "kind", "loss", "val_loss", "loops", "group_loops", "train_flops")
    records = lambda d: [tuple(r.get(k) for k in keys) for r in read_metrics(d)
                         if r["kind"] in ("train", "eval")]
    assert records(straight) == records(split)
    counts = [r["loops"] for r in train_records(straight)]
    assert counts[0] == 1 and counts[-1] > 1


# ----------------------------------------------------------------------------------------------
# The shipped experiment


def test_schedules_experiment_plans_every_variant_at_the_same_flops(tmp_path, monkeypatch):
    meta = {"format": "blockloop-tokens-v1", "dataset": "shakespeare_char", "vocab_size": 65,
            "dtype": "uint16", "tokenizer": {"kind": "char", "itos": ["a"] * 65}}
    data_dir = tmp_path / "data" / "shakespeare_char"
    data_dir.mkdir(parents=True)
    (data_dir / "meta.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)  # the experiment reads data/shakespeare_char
    exp = read_experiment_file(SCHEDULES)
    runs, info = plan_experiment(exp, tmp_path / "out")
    budget = exp.sections[0].budget["flops"]
    variants = {v["name"]: v for v in info["sections"][0]["variants"]}
    assert {"fixed", "sampled", "progressive", "curriculum"} <= set(variants)
    models = {}
    for r in runs:
        assert r.error is None, r.error
        train_cfg, overrides = build_configs(r.values)
        cfg = GPTConfig(block_size=train_cfg.block_size, vocab_size=65, **overrides)
        models[r.variant] = cfg
        with torch.device("meta"):
            model = GPT(cfg)
        tokens = train_cfg.batch_size * train_cfg.block_size * train_cfg.gradient_accumulation_steps
        # The expected FLOPs of the run, step by step (a sampled count at its mean).
        flops = sum(model.flops_per_token(scheduled_counts(cfg, i, r.iters)) * tokens
                    for i in range(r.iters))
        assert flops == pytest.approx(budget, rel=0.01), r.variant
        assert r.iters * r.flops_per_iter == pytest.approx(flops, rel=1e-9)
        assert train_cfg.max_iters == r.iters
    assert models["progressive"].loop_schedule == "progressive"
    assert models["curriculum"].loop_schedule == "curriculum"
    assert models["sampled"].loop_sampling == "poisson_lognormal"
    # Cheaper early steps buy the schedules more iterations than the fixed count.
    iters = {name: v["iters"] for name, v in variants.items()}
    assert iters["progressive"] > iters["curriculum"] > iters["fixed"] == iters["sampled"]
