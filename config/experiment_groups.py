"""Loop groups against their references: an even 2-block core and two groups with their own
counts, on character-level Tiny Shakespeare, each placed between its parameter-matched and
depth-matched plain models (the runner adds both).

    blockloop prepare shakespeare_char
    blockloop experiment config/experiment_groups.py      # -> experiments/groups/

Variants (n_layer 4 unless said):
- `core2_x3`: blocks 1-2 looped 3 times as one unit (an even core): depth 4 + 2*2 = 8;
- `core2_x3_token_exit`: the same with causal per-token exit at evaluation (relative change);
- `two_groups`: blocks 1-2 looped 3 times and block 3 twice: depth 4 + 2*2 + 1 = 9;
- `huginn_2_2_2`: 6 blocks, a 2-block core (2-3) started from noise with concat injection and a
  state norm, looped 3 times: depth 6 + 2*2 = 10.
"""

name = "groups"
description = "Loop groups (even cores, several groups) against parameter- and depth-matched plain models."

seeds = [1, 2, 3]
baselines = True
base = {
    "dataset": "shakespeare_char",
    "block_size": 64,
    "batch_size": 32,
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
    "loop_input_injection": "add",
}

variants = [
    {"name": "core2_x3", "n_layer": 4, "loop_groups": [[1, 2]], "max_loops": 3},
    {"name": "core2_x3_token_exit", "n_layer": 4, "loop_groups": [[1, 2]], "max_loops": 3,
     "automatic_loop_exit": True, "automatic_loop_exit_threshold": 0.05,
     "automatic_loop_exit_granularity": "token"},
    {"name": "two_groups", "n_layer": 4, "loop_groups": [[1, 2], [3, 3]], "loop_counts": [3, 2]},
    {"name": "huginn_2_2_2", "n_layer": 6, "loop_groups": [[2, 3]], "max_loops": 3,
     "loop_input_injection": "concat", "loop_state_init": "noise", "loop_noise_scale": 1.0,
     "loop_state_norm": "layernorm"},
]
budget = {"iters": 800}
evaluation = {"samples": 1, "sample_tokens": 200}
