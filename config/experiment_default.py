"""The default experiment (`make run`): looped vs plain transformers on a 2-core CPU, with
statistics that hold on another machine.

    blockloop prepare shakespeare_char
    blockloop experiment config/experiment_default.py        # -> experiments/default/

Two sections, run side by side as single-thread processes (`--jobs` defaults to the CPU count).
Every run of a seed sees the same training batches, so comparisons are paired by seed.

- **shakespeare**: character-level Tiny Shakespeare with small blocks (32 channels, 2 heads,
  context 64, batch 64, learning rate 5e-3, 800 iterations). Plain 4 layers and 1 layer, and
  the one block looped four times with additive input injection (effective depth 4, the
  parameters of 1 layer): the runner's depth-matched (plain 4) and parameter-matched (plain 1)
  references. Three seeds. Why this size: at a CPU budget of minutes, a wider model is limited
  by its number of steps, not its depth, so its plain references tie; narrow blocks are limited
  by their capacity, which depth buys. Measured on the 2-core development machine (AMD EPYC,
  AVX2), best validation loss over 3 seeds: nanoGPT's "baby" size (4x128, context 64, batch 12,
  2000 iterations), the previous section, plain 4 layers 1.8986 [1.8807, 1.9165] and plain 2
  layers 1.9002 [1.8888, 1.9117], no significant difference (and on the whole validation split
  too: 1.9160 against 1.9145); 64 channels, context 128, batch 16, 1000 iterations: plain 4
  and 1 layers tied at 2.05 (seed 1); this section's blocks at 1000 iterations, seeds 1-3:
  plain 4 layers 1.954, 1.982, 2.001 and plain 1 layer 2.045, 2.046, 2.048 (4 layers ahead by
  0.068 [0.013, 0.122], p = 0.033); at 800 iterations 2.022, 2.055, 2.067 against 2.103,
  2.111, 2.112 (0.8 of the cost, a similar gap: 800 it is, so that `make run` fits 20 minutes).
- **phop**: p-hop induction (tasks.py), where depth decides whether the task is solvable at
  all: plain 1 and 4 layers and one block looped to depth 4, five seeds, reported as solve rates
  (final accuracy >= 0.95) with Wilson intervals, since a seed either solves the task or not.
  The section also runs the **cross-model test-time depth protocol**: the same block trained at
  1, 2, 3, 4 and 6 iterations, each evaluated at every count, so the report can say whether
  running a model beyond its trained count beats training at that count.

Sizes for p-hop were chosen by measuring: at n = 8, p = 1, batch 128 the plain 4-layer model
reaches 0.994 final accuracy in 600 iterations (seed 1, this machine), while one layer cannot
implement the two-step lookup. Harder settings (p = 2, or n = 16) did not fit a CPU budget.

Cost: 44 runs; README.md gives the measured wall time of `make run` on a fresh clone.
"""

name = "default"
description = (
    "Looped vs plain transformers with equal training iterations: Tiny Shakespeare with narrow "
    "blocks, and p-hop induction with the cross-model test-time depth protocol."
)

baselines = True
# Training settings both sections share: nanoGPT's small-model choices (beta2 0.99, learning
# rate decayed to a tenth over the run, no dropout at this scale).
base = {
    "gradient_accumulation_steps": 1,
    "n_head": 4,
    "dropout": 0.0,
    "weight_decay": 0.1,
    "beta2": 0.99,
    "device": "cpu",
    "compile": False,
    "log_interval": 10,
}

sections = [
    {
        "name": "shakespeare",
        "description": (
            "Character-level Tiny Shakespeare with narrow blocks (32 channels, context 64, batch "
            "64). The looped model is the 1-layer model's block run four times: the unique "
            "blocks of plain 1 layer, the depth of plain 4."
        ),
        "base": {
            "dataset": "shakespeare_char",
            "n_embd": 32,
            "n_head": 2,
            "block_size": 64,
            "batch_size": 64,
            "learning_rate": 5e-3,
            "min_lr": 5e-4,
            "warmup_iters": 100,
            "eval_interval": 400,
            "eval_iters": 16,
        },
        "variants": [
            {"name": "plain_L4", "n_layer": 4},
            {"name": "plain_L1", "n_layer": 1},
            {"name": "loop_1x4", "n_layer": 1, "loop_center_idx": 0, "max_loops": 4,
             "loop_input_injection": "add"},
        ],
        "seeds": [1, 2, 3],
        "budget": {"iters": 800},
        "evaluation": {"samples": 1, "sample_tokens": 200, "exit_thresholds": [0.1, 0.01, 0.001]},
    },
    {
        "name": "phop",
        "description": (
            "p-hop induction, n = 8 tokens over 4 symbols (no adjacent repeats), trained at "
            "p = 1 hop; accuracy on 512 held-out sequences."
        ),
        "base": {
            "dataset": "phop",
            "phop_n": 8,
            "phop_alphabet": 4,
            "phop_hops": 1,
            "task_eval_size": 512,
            "n_embd": 64,
            "block_size": 9,
            "batch_size": 128,
            "learning_rate": 2e-3,
            "min_lr": 2e-4,
            "warmup_iters": 100,
            "eval_interval": 300,
            "eval_iters": 4,
        },
        "variants": [
            {"name": "plain_L1", "n_layer": 1},
            {"name": "plain_L4", "n_layer": 4},
            {"name": "loop_1x4", "n_layer": 1, "loop_center_idx": 0, "max_loops": 4},
        ],
        "cross_model_depth": {"variant": "loop_1x4", "train_loops": [1, 2, 3, 4, 6]},
        "seeds": [1, 2, 3, 4, 5],
        "solve_threshold": 0.95,
        "budget": {"iters": 600},
        "evaluation": {"hops": [1, 2, 3, 4], "exit_thresholds": [0.1, 0.01, 0.001]},
    },
]
