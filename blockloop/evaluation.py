"""Evaluation: the one place that computes validation loss and accuracy, test-time loop scaling,
automatic-exit threshold sweeps and mean iterations.

Training's periodic evaluation, the experiment runner's final evaluation and `blockloop analyze`
all call these functions, so the same checkpoint on the same batches gives the same numbers in
`metrics.jsonl`, `result.json` and `analysis.json`.

Definitions (over a list of `(x, y)` batches, `x`, `y` int64 `(B, L)`, `y = -1` unscored):
  - loss: cross-entropy averaged over every scored target of every batch (a short last batch
    counts for its size), in nats per token;
  - accuracy: fraction of scored targets where the argmax of the logits is the target;
  - iterations: per looped unit, the iterations each sequence ran (int64 `(N,)`, N sequences);
  - mean iterations: the mean over looped units of the per-sequence (or, with token exit,
    per-token) mean;
  - block applications: blocks applied per sequence (or token), n_layer plus len(unit) times
    (iterations - 1) summed over looped units; an exit sweep reports the mean and what it saves
    against running every iteration.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from blockloop.looping import block_applications, check_num_loops, effective_depth
from blockloop.records import finite_or_none
from blockloop.runtime import unwrap


@dataclass
class EvalResult:
    """Loss (nats/token), accuracy, scored-target count and per-unit iterations of one pass."""

    loss: float
    accuracy: float
    tokens: int
    iterations: list[torch.Tensor] = field(default_factory=list)
    block_applications: float | None = None

    @property
    def mean_iterations(self) -> float | None:
        return mean_iterations(self.iterations)

    def to_dict(self) -> dict:
        """JSON-ready summary; a non-finite loss becomes None (diverged)."""
        out = {"loss": finite_or_none(self.loss), "accuracy": self.accuracy}
        if self.iterations:
            out["mean_iterations"] = self.mean_iterations
            out["mean_block_applications"] = self.block_applications
        return out


def mean_iterations(iterations: list[torch.Tensor]) -> float | None:
    """Mean over looped units of the per-sequence iteration counts; None without a loop."""
    if not iterations:
        return None
    return torch.stack([i.float().mean() for i in iterations]).mean().item()


@contextmanager
def eval_mode(model):
    """Puts `model` in eval mode for the block and restores its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model, batches, *, device="cpu", ctx=None, **forward_kwargs) -> EvalResult:
    """Loss, accuracy and iterations of `model` (GPT, or DDP/compiled GPT) on `batches`.

    `ctx` is the autocast context (`blockloop.runtime.autocast_context`), float32 if None;
    `forward_kwargs` go to the model's forward: num_loops, loop_exit, exit_threshold. The model's
    train/eval mode is restored afterwards.
    """
    ctx = nullcontext() if ctx is None else ctx
    raw = unwrap(model)
    loss_sum, correct, counted, iterations = 0.0, 0, 0, []
    with eval_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with ctx:
                logits, loss = model(x, y, **forward_kwargs)
            mask = y != -1
            n = int(mask.sum().item())
            loss_sum += loss.float().item() * n
            correct += int((logits.argmax(-1)[mask] == y[mask]).sum().item())
            counted += n
            if raw.last_loop_iterations is not None:
                iterations.append([i.cpu() for i in raw.last_loop_iterations])
    per_unit = [torch.cat(unit) for unit in zip(*iterations)] if iterations else []
    applied = None
    if per_unit:
        applied = block_applications(raw.loop_plan, raw.config.n_layer, per_unit).mean().item()
    return EvalResult(
        loss=loss_sum / max(counted, 1), accuracy=correct / max(counted, 1), tokens=counted,
        iterations=per_unit, block_applications=applied,
    )


def loop_scaling(model, batches, counts, **kwargs) -> list[dict]:
    """Test-time loop scaling: `[{"num_loops", "loss", "accuracy"}]`, one row per count in
    `counts`, automatic exit off. `kwargs` as for `evaluate` (device, ctx). Raises ValueError
    for a count the model cannot run (see `blockloop.looping.check_num_loops`)."""
    config = unwrap(model).config
    for n in counts:
        check_num_loops(config, n)
    rows = []
    for n in counts:
        res = evaluate(model, batches, num_loops=n, loop_exit=False, **kwargs)
        rows.append({"num_loops": n, "loss": finite_or_none(res.loss), "accuracy": res.accuracy})
    return rows


def exit_sweep(model, batches, thresholds, num_loops: int, granularity: str | None = None,
               **kwargs) -> list[dict]:
    """Automatic exit at each threshold, with `num_loops` as the cap: `[{"threshold",
    "num_loops", "granularity", "loss", "accuracy", "mean_iterations",
    "mean_block_applications", "block_applications_saved"}]` in increasing threshold order.
    `granularity` "token" (causal: a validation loss no later token influenced) or "sequence";
    None takes the model's. `kwargs` as for `evaluate` (device, ctx)."""
    config = unwrap(model).config
    check_num_loops(config, num_loops)
    granularity = granularity or config.automatic_loop_exit_granularity
    full = effective_depth(config, num_loops)
    rows = []
    for threshold in sorted(set(thresholds)):
        res = evaluate(
            model, batches, num_loops=num_loops, loop_exit=True, exit_threshold=threshold,
            exit_granularity=granularity, **kwargs,
        )
        rows.append({"threshold": threshold, "num_loops": num_loops, "granularity": granularity,
                     **res.to_dict(),
                     "block_applications_saved": full - res.block_applications})
    return rows
