"""Cheap loop monitoring during training: is the loop becoming a contraction as it learns?

At each evaluation the trainer logs, per loop group, the relative change of the state at the
last iteration (`loop_delta_last`, dimensionless) and a few-step power-iteration estimate of the
iteration map's local Lipschitz constant there (`loop_lipschitz`: the largest singular value of
the Jacobian of s -> R(inject(s, x0)) at s_(T-1), mean over a few validation sequences). A
Lipschitz constant below 1 means the last iteration contracts (a fixed point is being
approached); above 1 it expands. The estimate is a lower bound that a few power iterations get
close to when the top singular values are well separated (`blockloop.dynamics.sigma_max`).

The cost is one traced forward pass on `MONITOR_SEQUENCES` sequences and `MONITOR_POWER_ITERS`
power iterations per looped unit; BENCHMARKS.md has it measured against training time.
"""

from __future__ import annotations

import torch

from blockloop.dynamics import iteration_map, sigma_max
from blockloop.evaluation import eval_mode
from blockloop.looping import group_means, relative_change

MONITOR_SEQUENCES = 4
MONITOR_POWER_ITERS = 4


def loop_monitor(model, idx: torch.Tensor, power_iters: int = MONITOR_POWER_ITERS) -> dict:
    """`{"loop_delta_last": [per group], "loop_lipschitz": [per group]}` for the looped `model`
    (a GPT, not a DDP/compiled wrapper) on token ids `idx` (B, L), at the trained counts, no
    automatic exit, in eval mode (restored after). Each value is the mean over the group's
    units and the sequences."""
    deltas, sigmas = [], []
    with eval_mode(model):
        with torch.no_grad():
            model(idx, loop_exit=False, trace=True)
        units = model.last_loop_trace.units
        for k, unit in enumerate(units):
            t = unit.states.shape[0] - 1
            deltas.append(relative_change(unit.states[t], unit.states[t - 1]))
            step = iteration_map(model, k, unit.x0, t)
            sigmas.append(sigma_max(step, unit.states[t - 1], iters=power_iters))
    plan = model.loop_plan
    return {
        "loop_delta_last": group_means(plan, deltas).tolist(),
        "loop_lipschitz": group_means(plan, sigmas).tolist(),
    }
