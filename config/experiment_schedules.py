"""Loop schedules at equal training FLOPs: fixed, sampled, progressive and curriculum counts.

    blockloop prepare shakespeare_char
    blockloop experiment config/experiment_schedules.py      # -> experiments/schedules/

One looped architecture on character-level Tiny Shakespeare (context 64, n_embd 64): two
blocks, the second looped three times with additive injection (effective depth 4). It is
trained four ways, each run getting the iterations that make its expected training FLOPs equal
the budget (`blockloop.experiment.plan`, exact for the schedules: it sums each step's cost over
the schedule):

- `fixed`: 3 iterations at every step;
- `sampled`: Poisson-lognormal counts with mean 3 (`loop_sampling`), the recurrent-depth recipe;
- `progressive`: 1 iteration for the first half of training, then 3 (`loop_schedule`);
- `curriculum`: the count ramps linearly from 1 to 3 over the first half, then stays at 3.

The cheaper early steps of the two schedules buy them more iterations. At this budget the
planner gives 1042 iterations to `fixed` and `sampled` (the sampler's mean count is taken as
its expected cost), 1381 to `progressive` (mean count 2) and 1188 to `curriculum` (mean count
about 2.5: the ramp is rounded half up); every variant's expected FLOPs are within 0.01% of
the budget. The runner adds the parameter-matched (plain 2 layers, 2045 iterations) and
depth-matched (plain 4 layers, 1042) references at the same budget. Every run is evaluated at the trained count and, for the loop
scaling curves, at other counts, so the report shows both the loss at equal compute and whether
a schedule changes how the model extrapolates to more iterations.

What to expect, stated as the question it answers rather than a result: whether spending the
first half of training at depth 2 (progressive) or ramping (curriculum) and using the savings
for more steps beats training at full depth throughout. At this scale differences between
variants may be within the seed-to-seed spread (two seeds); read the report's intervals before
concluding anything. The budget was chosen so that one run takes about two minutes on one
thread of the development machine (measured over 60 iterations: about 0.11 s per iteration of
`fixed`, so 12 runs take about 25 minutes on one thread). Its one full run (2 seeds, 17.6
minutes two at a time) is in docs/results/schedules/ and summarised in README.md.
"""

name = "schedules"
description = (
    "Fixed, sampled, progressive and curriculum iteration counts for one looped model, at equal "
    "training FLOPs, on character-level Tiny Shakespeare."
)

seeds = [1, 2]
baselines = True
base = {
    "dataset": "shakespeare_char",
    "block_size": 64,
    "batch_size": 16,
    "gradient_accumulation_steps": 1,
    "n_head": 4,
    "n_embd": 64,
    "dropout": 0.0,
    "learning_rate": 4e-3,
    "min_lr": 4e-4,
    "warmup_iters": 50,
    "weight_decay": 0.1,
    "beta2": 0.99,
    "eval_interval": 100,
    "eval_iters": 10,
    "log_interval": 10,
    "device": "cpu",
    "compile": False,
}

# Two blocks, the second looped three times with the input added back at every iteration.
LOOP = {"n_layer": 2, "loop_center_idx": 1, "max_loops": 3, "loop_input_injection": "add"}

variants = [
    {"name": "fixed", **LOOP},
    {"name": "sampled", **LOOP, "loop_sampling": "poisson_lognormal"},
    {"name": "progressive", **LOOP, "loop_schedule": "progressive", "loop_schedule_fraction": 0.5},
    {"name": "curriculum", **LOOP, "loop_schedule": "curriculum", "loop_schedule_fraction": 0.5},
]
# Training FLOPs per run (train.py's count: 6 per parameter applied, plus attention).
budget = {"flops": 1.5e12}
evaluation = {"samples": 1, "sample_tokens": 200}
