"""A tiny experiment for tests and for trying the runner: seconds per run, nothing learnt.

    blockloop prepare shakespeare_char
    blockloop experiment config/experiment_tiny.py --out /tmp/tiny

It has the shape of config/experiment_default.py at a scale where only the machinery is
exercised: a token-data section (plain and looped variants, two seeds; the runner adds the
depth-matched plain reference) and a p-hop section (one seed). The tests run it on a small fake
`data/shakespeare_char` of their own.
"""

name = "tiny"
description = "Runner smoke test: a handful of iterations per run."

seeds = [1, 2]
baselines = True
# Shared by both sections; each section adds its data and sizes.
base = {
    "gradient_accumulation_steps": 1,
    "n_head": 2,
    "n_embd": 16,
    "dropout": 0.0,
    "learning_rate": 1e-3,
    "min_lr": 1e-4,
    "warmup_iters": 0,
    "eval_interval": 4,
    "eval_iters": 2,
    "log_interval": 1,
    "device": "cpu",
    "compile": False,
}

sections = [
    {
        "name": "chars",
        "base": {"dataset": "shakespeare_char", "block_size": 16, "batch_size": 4},
        "variants": [
            {"name": "plain_L2", "n_layer": 2},
            {"name": "loop_L2x3", "n_layer": 2, "loop_center_idx": 1, "max_loops": 3},
        ],
        "budget": {"iters": 8},
        "evaluation": {"test_loops": [1, 2, 4, 8], "exit_thresholds": [0.1, 0.01],
                       "samples": 2, "sample_tokens": 24},
    },
    {
        "name": "phop",
        "base": {"dataset": "phop", "phop_n": 8, "phop_alphabet": 4, "phop_hops": 1,
                 "task_eval_size": 64, "block_size": 9, "batch_size": 16},
        "variants": [
            {"name": "plain_L1", "n_layer": 1},
            {"name": "loop_L1x2", "n_layer": 1, "loop_center_idx": 0, "max_loops": 2,
             "loop_input_injection": "add"},
        ],
        "seeds": [1],
        "budget": {"iters": 8},
        "evaluation": {"test_loops": [1, 2, 4], "exit_thresholds": [0.1, 0.01]},
    },
]
