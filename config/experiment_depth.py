"""The cross-model test-time depth protocol on p-hop induction: is running a looped model for
more iterations than it was trained with as good as training it at that count?

    blockloop experiment config/experiment_depth.py      # -> experiments/depth/

One unique block (n_layer 1, loop_center_idx 0) is trained at r = 1, 2, 3, 4 and 6 iterations
(`cross_model_depth` below: the variant `loop_1x4` stands for r = 4, the runner adds
`loop_1x4_r1`, `_r2`, `_r3` and `_r6`), three seeds each, and every run is evaluated at every
count r'. The report's "Cross-model test-time depth" part shows the accuracy of each trained r at
each r' and says, for every r < r' and paired by seed, whether the model trained at r and run at
r' beats, ties with or loses to the model trained at r'.

The p-hop settings are those of the `phop` section of config/experiment_default.py (n = 8
tokens over 4 symbols, trained at p = 1 hop), where depth decides whether the task is solvable.
Plain references are off: the protocol compares the looped models with each other, and the
default experiment already places `loop_1x4` between its plain references. 15 runs of 2000
iterations; not run in full. The default experiment runs the same protocol for 600 iterations
(13 to 62 s per run there), so expect about 3.3 times those times per run here. With a
`{"flops": F}` budget each trained count would get its own number of iterations; this file
compares at equal iterations (equal training data).
"""

name = "depth"
description = (
    "Cross-model test-time depth on p-hop: one block trained at 1, 2, 3, 4 and 6 iterations, "
    "each evaluated at every count."
)

seeds = [1, 2, 3]
baselines = False
base = {
    "dataset": "phop",
    "phop_n": 8,
    "phop_alphabet": 4,
    "phop_hops": 1,
    "task_eval_size": 512,
    "block_size": 9,
    "batch_size": 128,
    "gradient_accumulation_steps": 1,
    "n_head": 4,
    "n_embd": 64,
    "dropout": 0.0,
    "weight_decay": 0.1,
    "beta2": 0.99,
    "learning_rate": 2e-3,
    "min_lr": 2e-4,
    "warmup_iters": 100,
    "eval_interval": 100,
    "eval_iters": 4,
    "log_interval": 10,
    "device": "cpu",
    "compile": False,
}

variants = [
    {"name": "loop_1x4", "n_layer": 1, "loop_center_idx": 0, "max_loops": 4},
]
cross_model_depth = {"variant": "loop_1x4", "train_loops": [1, 2, 3, 4, 6]}
budget = {"iters": 2000}
evaluation = {"hops": [1, 2, 3, 4]}
