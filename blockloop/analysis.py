"""What happens to the representation across loop iterations: metrics, figures and a report.

`blockloop analyze --out_dir=DIR` loads a trained looped model, runs it on the fixed validation
batches with the loop trace on (`blockloop.looping`: per looped unit, the states s_0 .. s_T) and
measures, per unit and iteration t:

- dynamics: the relative change delta_t (the quantity automatic exit thresholds), the cosine of
  each token's state to the previous and to the final state, and the state's L2 norm;
- a logit lens: the loss the model would have if the loop stopped at s_t (defined below);
- linear CKA between the token representations of every pair of iterations;
- a 2-D PCA trajectory of a few tokens' states;
and, from separate forward passes through `blockloop.evaluation` (the same functions training
and the experiment runner use, so the numbers agree with theirs): the exit iterations under
automatic exit, an exit sweep (`exit_sweep`: loss against mean iterations used, per threshold),
and test-time loop scaling (`loop_scaling`: validation loss at the counts of
`blockloop.looping.scaling_loop_counts`, which include the trained count and twice it). Every pass
runs under the run's own autocast dtype.

Loop dynamics (`dynamics`, from `blockloop.dynamics.loop_dynamics`): per looped unit and
iteration, means over sequences with 95% bootstrap intervals of the step norm, delta_t, the
cosine between successive steps, the state norm, logit-lens loss, entropy and KL between
consecutive iterates (nats), and the Lipschitz constant of the iteration map (power iteration);
trajectory fates after several times the trained count, and a box-counting dimension. Loop
against layer (`loop_against_layer`, with `analyze --compare_to=DIR`): linear CKA between each
iterate and each block output of a plain model on the same tokens. `jacobian_sigma_max(model,
idx, group=0, iteration=None)` (float32 (B,): the Lipschitz constant per sequence) is
re-exported from `blockloop.dynamics`.

The metric functions (`linear_cka`, `cka_matrix`, `token_dynamics`, `pca_trajectories`,
`logit_lens_losses`, `loop_against_layer`, `analyze_model`) take tensors and models and return numbers, so other code
(the experiment runner) can call them without touching files; `write_report` turns their result
into `analysis.json`, PNG figures and `analysis.md`; `analyze_checkpoint` and `main` do the whole
thing for a checkpoint directory.

Definitions (also in the docstrings of the functions that compute them):

- Logit lens, "continue" variant (the default): the loss of the model if the output of looped
  unit k were s_t, i.e. s_t goes through the remaining looped units (each looping the same number
  of times as in the traced pass, without automatic exit), the blocks after the loop, ln_f and
  lm_head. For the last unit with no block after the loop this is ln_f + lm_head applied to s_t.
  At t = T it is the model's own loss. The "direct" variant applies ln_f + lm_head to s_t
  whatever follows, the classic logit lens, which reads a mid-stack state through a head that
  was never trained on it.
- Linear CKA (Kornblith et al. 2019): rows are tokens, columns channels; both matrices are
  centred over tokens, and CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with the linear
  kernels K = X X^T, L = Y Y^T, which reduces to ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F).
"""

from __future__ import annotations

import argparse
import math
import sys
from contextlib import nullcontext
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, NullFormatter

from blockloop.checkpoint import find_run_checkpoint, load_model
from blockloop.config import TrainConfig
from blockloop.dynamics import (
    DEFAULT_FATE_FACTOR,
    DEFAULT_LIPSCHITZ_ITERS,
    DEFAULT_LIPSCHITZ_SEQUENCES,
    FATES,
    cka_across,
    jacobian_sigma_max,  # noqa: F401  (re-exported: blockloop.analysis.jacobian_sigma_max)
    loop_dynamics,
)
from blockloop.errors import AnalysisError, CheckpointError, ConfigError, run_command
from blockloop.evaluation import eval_mode, evaluate, exit_sweep, loop_scaling
from blockloop.looping import (
    MAX_LOOPS_LIMIT,
    LoopPlan,
    check_num_loops,
    effective_depth,
    is_looped,
    scaling_loop_counts,
    trained_counts,
)
from blockloop.model import GPT, GPTConfig
from blockloop.records import atomic_write_json, finite_or_none, jsonable
from blockloop.runtime import autocast_context, resolve_device, resolve_dtype
from blockloop.train import TrainingData

# Exit threshold used for the exit histogram when the model was not configured with automatic
# exit (its configured threshold then says nothing about how it was meant to be used).
DEFAULT_EXIT_THRESHOLD = 1e-2
DEFAULT_THRESHOLDS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
# With the default sweep, thresholds at these quantiles of the observed delta_t (at the
# iterations where exit is checked) are added: a fixed grid alone can miss the whole range in
# which a given model's sequences actually differ.
SWEEP_DELTA_QUANTILES = (0.1, 0.3, 0.5, 0.7, 0.9)
# Token rows used for CKA: the Gram matrices are n x n per iteration, so n bounds memory and
# time (17 iterations x 512^2 float64 is 36 MB); CKA estimates are stable well below this n.
DEFAULT_CKA_TOKENS = 512
DEFAULT_PCA_TOKENS = 8
# Seeds the token subsets (and loop noise, if the model draws it in eval) so reruns agree.
ANALYSIS_SEED = 0
# Allowed ranges of the dynamics options (a typo must not start hours of power iteration).
DYNAMICS_LIMITS = {"fate_factor": (1, 64), "lipschitz_sequences": (1, 4096),
                   "lipschitz_iters": (1, 1000)}

FIGURES = {
    "dynamics": (
        "dynamics.png",
        "Relative change delta_t (left, log scale; band = one standard deviation over sequences) "
        "should fall towards the exit threshold if the loop converges, and the cosines (right) "
        "approach 1 when successive states, and the state and its final value, line up.",
    ),
    "norm": (
        "norm.png",
        "Mean L2 norm of the token states per iteration (band = one standard deviation over "
        "tokens): steady growth means each iteration adds to the residual stream rather than "
        "settling.",
    ),
    "logit_lens": (
        "logit_lens.png",
        "Validation loss if the loop stopped at iteration t (solid: the rest of the model still "
        "runs; dashed: ln_f and the head applied directly to s_t); the solid line meets the "
        "dotted model loss at the last iteration, and a flat tail means later iterations no "
        "longer help.",
    ),
    "exit_histogram": (
        "exit_histogram.png",
        "How many sequences stopped at each iteration under automatic exit at the threshold in "
        "the title; mass at the cap means the threshold is rarely reached.",
    ),
    "exit_sweep": (
        "exit_sweep.png",
        "Validation loss against the mean iterations used, for automatic exit at each threshold "
        "(labelled) and for a fixed number of iterations; exit points below the fixed-count curve "
        "spend compute better than a fixed count.",
    ),
    "pca": (
        "pca.png",
        "Each line follows one token's state across iterations (circle: s_0, square: s_T) in the "
        "plane of the two main principal components of those states; trajectories that shrink "
        "into a point converge, loops or long straight runs do not.",
    ),
    "cka": (
        "cka.png",
        "Linear CKA between the token representations at iterations t and t' (1 = the same up to "
        "rotation and scale; the colour scale starts just below the smallest value); a bright "
        "lower-right block means the late iterations barely change the representation.",
    ),
    "loop_scaling": (
        "loop_scaling.png",
        "Validation loss at a fixed number of iterations, including counts beyond the trained one "
        "(dashed line); a curve that keeps falling or stays flat past the line extrapolates, one "
        "that rises does not.",
    ),
    "loop_dynamics": (
        "loop_dynamics.png",
        "One row per looped unit, mean over validation sequences per iteration t with a 95% "
        "bootstrap band: the step norm and the relative change falling towards 0 mean the loop "
        "settles; the cosine between successive steps near -1 means the state flips back and "
        "forth (a 2-cycle), near +1 that it keeps drifting one way; a Lipschitz constant below "
        "the dashed line at 1 means the iteration map contracts around the trajectory (nearby "
        "states move closer), above 1 that it expands them.",
    ),
    "loop_lens": (
        "loop_lens.png",
        "The logit lens at each iterate (mean with 95% bootstrap band): loss and entropy of the "
        "next-token distribution if the loop stopped at t, and the KL divergence between the "
        "distributions of consecutive iterates (log scale); a KL that falls by orders of "
        "magnitude means later iterations no longer change the prediction.",
    ),
    "loop_fates": (
        "loop_fates.png",
        "Left: what each token's trajectory does when the loop runs several times its trained "
        "count (fixed point, cycle with its period, diverging, or undecided 'wandering'); right: "
        "box counting on all those iterates projected on their two main principal components, "
        "whose slope over the stated box sides is the box-counting dimension (about 0 for "
        "points, 1 for curves, 2 for a filled area).",
    ),
}
# Drawn only when the result has "loop_against_layer" (`analyze --compare_to`).
COMPARE_FIGURES = {
    "loop_vs_layer": (
        "loop_vs_layer.png",
        "Linear CKA between each loop iterate (rows) and each block output of the plain model "
        "(columns; 0 = embedding); red squares mark the layer at the iterate's depth in the "
        "unrolled stack, white dots the best-matching layer: if the bright cells follow the red "
        "squares the loop imitates depth, if they stay in one column or elsewhere it computes "
        "something else.",
    ),
}


# ----------------------------------------------------------------------------------------------
# pure metrics on states


def _centred64(x) -> torch.Tensor:
    x = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    if x.dim() != 2:
        raise ValueError(f"expected a (tokens, channels) matrix, got shape {tuple(x.shape)}")
    return x - x.mean(dim=0, keepdim=True)


def linear_cka(X, Y) -> float:
    """Linear CKA between two representations of the same n tokens (rows), in float64.

    Columns are centred over tokens; the result is ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F),
    which equals HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) for the linear kernels K = X X^T,
    L = Y Y^T. X and Y may have different numbers of columns. NaN if either is constant.
    """
    x, y = _centred64(X), _centred64(Y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"X has {x.shape[0]} rows but Y has {y.shape[0]}; rows must be the same tokens")
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    denom = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / denom) if denom > 0 else float("nan")


def cka_matrix(states) -> np.ndarray:
    """Linear CKA between every pair of iterations: states (T+1, n, C) -> (T+1, T+1) float64.

    Uses the token-space form: with centred X_t and Gram matrix K_t = X_t X_t^T,
    CKA(t, t') = <K_t, K_t'> / (||K_t|| ||K_t'||), so each Gram matrix is formed once
    (n x n each) rather than one C x C product per pair.
    """
    grams = []
    for s in states:
        x = _centred64(s)
        grams.append((x @ x.T).flatten())
    g = torch.stack(grams)
    inner = g @ g.T
    norms = torch.sqrt(torch.diagonal(inner))
    # A constant state has a zero Gram matrix: 0/0 gives NaN, as in linear_cka.
    return (inner / torch.outer(norms, norms)).numpy()


def token_dynamics(states) -> dict:
    """Per-token quantities from states (T+1, ..., C); every leading dimension after the first
    is flattened into tokens N.

    Returns float64 CPU tensors: `norm` (T+1, N) = ||s_t||; `cos_prev` (T, N) =
    cos(s_t, s_{t-1}) for t = 1..T; `cos_final` (T+1, N) = cos(s_t, s_T). Computed on the
    states' device, one iteration at a time in float64, so a GPT-2-sized trace needs one extra
    (N, C) float64 copy rather than a float64 copy of the whole trace.
    """
    s = torch.as_tensor(states).detach()
    s = s.reshape(s.shape[0], -1, s.shape[-1])
    final = s[-1].double()
    norm, cos_prev, cos_final, prev = [], [], [], None
    for state in s:
        cur = state.double()
        norm.append(cur.norm(dim=-1))
        cos_final.append(F.cosine_similarity(cur, final, dim=-1))
        if prev is not None:
            cos_prev.append(F.cosine_similarity(cur, prev, dim=-1))
        prev = cur
    return {
        "norm": torch.stack(norm).cpu(),
        "cos_prev": torch.stack(cos_prev).cpu(),
        "cos_final": torch.stack(cos_final).cpu(),
    }


def pca_trajectories(states, n_components: int = 2) -> dict:
    """PCA fitted on all the states of a few tokens, projected per iteration.

    states: (T+1, n, C), the states of n tokens at every iteration. The (T+1)*n rows are centred
    and the principal axes are the top eigenvectors of their covariance, each signed so that its
    largest-magnitude loading is positive (an SVD's signs are arbitrary). Returns
    `projections` (T+1, n, k), `components` (k, C) and `explained_variance_ratio` (k,), numpy.
    """
    s = torch.as_tensor(states).detach().to(device="cpu", dtype=torch.float64)
    # A diverged trajectory (NaN/inf, or values whose covariance overflows) has no principal
    # axes: the axes are fitted on the finite iterations, the others project to NaN.
    finite = torch.isfinite(s).flatten(1).all(dim=1)
    rows = s[finite].reshape(-1, s.shape[-1])
    mean = rows.mean(dim=0)
    centred = rows - mean
    cov = centred.T @ centred / max(rows.shape[0] - 1, 1)
    if rows.shape[0] == 0 or not bool(torch.isfinite(cov).all()):
        nan = np.full((s.shape[0], s.shape[1], n_components), np.nan)
        return {"projections": nan, "components": np.full((n_components, s.shape[-1]), np.nan),
                "explained_variance_ratio": np.full(n_components, np.nan)}
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(eigvals, descending=True)[:n_components]
    comps = eigvecs[:, order].T
    pivot = comps.abs().argmax(dim=1)
    signs = torch.sign(comps[torch.arange(comps.shape[0]), pivot])
    comps = comps * signs[:, None]
    total = eigvals.clamp_min(0).sum()
    ratio = eigvals[order].clamp_min(0) / total if total > 0 else torch.zeros(len(order))
    proj = (s - mean) @ comps.T
    proj[~finite] = float("nan")
    return {
        "projections": proj.numpy(),
        "components": comps.numpy(),
        "explained_variance_ratio": ratio.numpy(),
    }


# ----------------------------------------------------------------------------------------------
# model-level metrics


def _require_trace(model: GPT) -> None:
    if model.looper is None:
        raise AnalysisError(
            "the model has no looped blocks (loop_center_idx=-1), so there is no loop to analyse"
        )
    if not model.config.loops_representation:
        raise AnalysisError(
            "the model does not record loop traces; build it with loops_representation=True "
            "(`tracing_copy(model)` does, keeping the weights)"
        )


def tracing_copy(model: GPT) -> GPT:
    """A copy of `model` with `loops_representation=True` (the trace on) and the same weights.

    Returns `model` itself if it already records traces.
    """
    if model.looper is not None and model.config.loops_representation:
        return model
    config = GPTConfig(**{**model.config.to_dict(), "loops_representation": True})
    copy = GPT(config).to(next(model.parameters()).device)
    copy.load_state_dict(model.state_dict())
    return copy.train(model.training)


def _head_loss(model: GPT, x, targets) -> torch.Tensor:
    """ln_f, lm_head and cross-entropy, exactly as GPT.forward ends."""
    logits = model.lm_head(model.transformer.ln_f(x))
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
    )


def _loss_after_unit(model: GPT, unit_index: int, x, targets, num_loops: int) -> torch.Tensor:
    """The loss if looped unit `unit_index` had output `x`: the later units (looping
    `num_loops` times, no automatic exit), the blocks after the loop, then the head.

    The rest of the stack is the model's own (`GPT.continue_after_unit`), so injection,
    adapters, noise and later loop groups follow the model's definition.
    """
    return _head_loss(model, model.continue_after_unit(x, unit_index, num_loops), targets)


@torch.no_grad()
def _lens_from_trace(model: GPT, trace, targets, num_loops: int) -> list[dict]:
    out = []
    for k, unit in enumerate(trace.units):
        cont, direct = [], []
        for s in unit.states:
            cont.append(_loss_after_unit(model, k, s, targets, num_loops).item())
            direct.append(_head_loss(model, s, targets).item())
        out.append({"blocks": list(unit.blocks), "continue": cont, "direct": direct})
    return out


@torch.no_grad()
def logit_lens_losses(model: GPT, idx, targets, *, num_loops: int | None = None) -> dict:
    """Logit-lens losses of every looped unit at every iteration t = 0..T, on one batch.

    Runs the model once (no automatic exit, `num_loops` iterations, default the trained count)
    with the trace on, then for unit k and state s_t:
      - `continue`[t]: the model's loss if unit k's output were s_t: the remaining looped units
        (each iterating `num_loops` times), the blocks after the loop, ln_f and lm_head;
        `continue`[T] is the model's own loss;
      - `direct`[t]: ln_f + lm_head applied to s_t, whatever blocks would follow.
    t = 0 is the unit's input (the loop skipped). Returns {"model_loss": float, "units": [
    {"blocks", "continue", "direct"}, ...]}. The model must record traces (`tracing_copy`).
    """
    _require_trace(model)
    num_loops = model.config.max_loops if num_loops is None else int(num_loops)
    with eval_mode(model):
        _, loss = model(idx, targets, num_loops=num_loops, loop_exit=False)
        units = _lens_from_trace(model, model.last_loop_trace, targets, num_loops)
    return {"model_loss": loss.item(), "units": units}


def _histogram(iterations: torch.Tensor, num_loops: int) -> list[int]:
    """counts[t-1] = number of sequences (or tokens, with token exit) that ran t iterations,
    t = 1..num_loops."""
    return torch.bincount(iterations.flatten(), minlength=num_loops + 1)[1:].tolist()


def _pick_rows(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=generator)[: min(k, n)].sort().values


def _summary(values: torch.Tensor) -> tuple[list, list]:
    """Mean and (population) standard deviation along dim 1, ignoring NaN."""
    v = values.to(torch.float64)
    mean = torch.nanmean(v, dim=1)
    std = torch.sqrt(torch.nanmean((v - mean[:, None]) ** 2, dim=1))
    return mean.tolist(), std.tolist()


def _check_loops(config: GPTConfig, num_loops, key: str = "num_loops") -> None:
    """`looping.check_num_loops`, reported as an AnalysisError (one line naming `key`)."""
    try:
        check_num_loops(config, num_loops, key)
    except ValueError as e:
        raise AnalysisError(str(e)) from None


def _pca_tokens(x: torch.Tensor, pca_tokens: int, token_labels) -> tuple:
    """PCA tokens of batch x (B, L): evenly spaced positions spread over its sequences.

    Returns (sequence indices (k,), positions (k,), [{"sequence", "position", "token", "label"}]).
    """
    B, L = x.shape
    k = min(pca_tokens, B * L)
    pos = torch.linspace(0, L - 1, k).round().long()
    seq = torch.arange(k) % B
    ids = x[seq.to(x.device), pos.to(x.device)].tolist()
    info = [
        {"sequence": int(s), "position": int(p), "token": int(i),
         "label": f"pos {int(p)} {token_labels(int(i)) if token_labels else int(i)}"}
        for s, p, i in zip(seq.tolist(), pos.tolist(), ids)
    ]
    return seq, pos, info


def _new_accumulator() -> dict:
    return {"norm": [], "cos_prev": [], "cos_final": [], "delta": [], "cka": [], "lens": [],
            "direct": [], "pca_states": None, "pca_tokens": []}


def _accumulate(acc: dict, unit_trace, lens: dict, rows: torch.Tensor) -> None:
    """Add one batch's trace of one looped unit (states (T+1, B, L, C)) to `acc`."""
    dyn = token_dynamics(unit_trace.states)
    for key in ("norm", "cos_prev", "cos_final"):
        acc[key].append(dyn[key])
    acc["delta"].append(unit_trace.deltas.cpu().to(torch.float64))
    # Only the sampled rows leave the device: the full trace is (T+1) activations.
    states = unit_trace.states
    acc["cka"].append(states.reshape(states.shape[0], -1, states.shape[-1])[:, rows].cpu())
    acc["lens"].append(lens["continue"])
    acc["direct"].append(lens["direct"])


@torch.no_grad()
def _trace_batches(model: GPT, batches, num_loops: int, device, ctx, cka_tokens: int,
                   pca_tokens: int, token_labels) -> list[dict]:
    """Run the traced pass (`num_loops` iterations, no exit) on every batch; per looped unit,
    the per-batch dynamics, deltas, CKA rows, logit-lens losses and batch 0's PCA states."""
    torch.manual_seed(ANALYSIS_SEED)
    gen = torch.Generator().manual_seed(ANALYSIS_SEED)
    accs = [_new_accumulator() for _ in model.loop_plan.units]
    rows_per_batch = math.ceil(cka_tokens / len(batches))
    with eval_mode(model), (nullcontext() if ctx is None else ctx):
        for b, (x, y) in enumerate(batches):
            x, y = x.to(device), y.to(device)
            model(x, y, num_loops=num_loops, loop_exit=False)
            trace = model.last_loop_trace
            lens = _lens_from_trace(model, trace, y, num_loops)
            rows = _pick_rows(x.numel(), rows_per_batch, gen).to(device)
            if b == 0:
                seq, pos, info = _pca_tokens(x, pca_tokens, token_labels)
            for acc, unit_trace, unit_lens in zip(accs, trace.units, lens):
                _accumulate(acc, unit_trace, unit_lens, rows)
                if b == 0:
                    acc["pca_states"] = unit_trace.states[:, seq.to(device), pos.to(device)].cpu()
                    acc["pca_tokens"] = info
    return accs


def _unit_result(blocks, group: int, acc: dict, num_loops: int) -> dict:
    """The per-unit entry of the result from a `_trace_batches` accumulator."""
    delta_mean, delta_std = _summary(torch.cat(acc["delta"], dim=1))
    norm_mean, norm_std = _summary(torch.cat(acc["norm"], dim=1))
    cos_prev_mean, _ = _summary(torch.cat(acc["cos_prev"], dim=1))
    cos_final_mean, _ = _summary(torch.cat(acc["cos_final"], dim=1))
    pca = pca_trajectories(acc["pca_states"])
    return {
        "blocks": list(blocks),
        "group": group,
        "iterations": list(range(num_loops + 1)),
        "delta_mean": delta_mean,
        "delta_std": delta_std,
        "cos_prev_mean": cos_prev_mean,
        "cos_final_mean": cos_final_mean,
        "norm_mean": norm_mean,
        "norm_std": norm_std,
        "logit_lens_loss": np.mean(acc["lens"], axis=0).tolist(),
        "logit_lens_direct_loss": np.mean(acc["direct"], axis=0).tolist(),
        "cka": cka_matrix(torch.cat(acc["cka"], dim=1)).tolist(),
        "pca": {
            "tokens": acc["pca_tokens"],
            "explained_variance_ratio": pca["explained_variance_ratio"].tolist(),
            "trajectories": pca["projections"].tolist(),
        },
    }


def _default_thresholds(accs: list[dict], num_loops: int) -> set[float]:
    """DEFAULT_THRESHOLDS plus the SWEEP_DELTA_QUANTILES of the delta_t observed where exit is
    checked (t = 2 .. T-1, i.e. deltas[1 : T-1]), rounded to two significant digits."""
    thresholds = set(DEFAULT_THRESHOLDS)
    checked = torch.cat(
        [torch.cat(acc["delta"], dim=1)[1 : num_loops - 1].flatten() for acc in accs]
    )
    checked = checked[torch.isfinite(checked)]
    if checked.numel():
        qs = torch.quantile(checked, torch.tensor(SWEEP_DELTA_QUANTILES, dtype=checked.dtype))
        thresholds |= {float(f"{q:.2g}") for q in qs.tolist()}
    return thresholds


def _model_loss(model: GPT, batches, num_loops: int, scaling: list[dict], **kwargs):
    """The loss at `num_loops` iterations without exit: the loop-scaling row if there is one."""
    for row in scaling:
        if row["num_loops"] == num_loops:
            return row["loss"]
    res = evaluate(model, batches, num_loops=num_loops, loop_exit=False, **kwargs)
    return finite_or_none(res.loss)


def _settings(config: GPTConfig, num_loops, exit_threshold, loop_counts) -> tuple:
    """(traced count, exit threshold, loop-scaling counts) with `analyze_model`'s defaults.
    Raises AnalysisError for a count the model cannot run."""
    T = config.max_loops if num_loops is None else num_loops
    _check_loops(config, T)
    if exit_threshold is None:
        exit_threshold = (
            config.automatic_loop_exit_threshold if config.automatic_loop_exit
            else DEFAULT_EXIT_THRESHOLD
        )
    counts = scaling_loop_counts(config, (T,)) if loop_counts is None else sorted(set(loop_counts))
    for n in counts:
        _check_loops(config, n, "loop_counts")
    return T, exit_threshold, counts


@torch.no_grad()
def analyze_model(
    model: GPT, batches, *, num_loops: int | None = None, device="cpu", ctx=None,
    exit_threshold: float | None = None, thresholds=None, loop_counts=None,
    cka_tokens: int = DEFAULT_CKA_TOKENS, pca_tokens: int = DEFAULT_PCA_TOKENS,
    token_labels=None, fate_factor: int = DEFAULT_FATE_FACTOR,
    lipschitz_sequences: int = DEFAULT_LIPSCHITZ_SEQUENCES,
    lipschitz_iters: int = DEFAULT_LIPSCHITZ_ITERS, compare_model: GPT | None = None,
) -> dict:
    """Every metric of this module for `model` on `batches` (a list of (x, y), int64 (B, L),
    y = -1 unscored); JSON-ready, losses in nats per token, NaN (undefined) as None.

    `model` must record traces (`tracing_copy`). `num_loops` (default: the trained count) is the
    iteration count of the traced pass and the cap under automatic exit. `ctx` is the autocast
    context of every pass (`runtime.autocast_context`; None: float32). `exit_threshold`
    (default: the configured one if the model exits automatically, else DEFAULT_EXIT_THRESHOLD)
    sets the exit histogram. `thresholds` is the sweep (always with `exit_threshold`); None means
    `_default_thresholds`. `loop_counts` (default `looping.scaling_loop_counts` with `num_loops`)
    are the loop-scaling counts. `token_labels(id) -> str` names tokens in the PCA legend.
    `model_loss`, `loop_scaling`, `exit` and `exit_sweep` come from `blockloop.evaluation`.
    `dynamics` is `dynamics.loop_dynamics` with the three dynamics options (see there); with a
    plain `compare_model`, `loop_against_layer` is `loop_against_layer(model, compare_model)`.
    Raises AnalysisError without a trace or batches, for a count the model cannot run, a bad
    dynamics option or an incomparable `compare_model`, before any pass.
    """
    _require_trace(model)
    if not batches:
        raise AnalysisError("no validation batches to analyse")
    cfg = model.config
    T, exit_threshold, counts = _settings(cfg, num_loops, exit_threshold, loop_counts)
    check_dynamics_options(cfg, fate_factor, lipschitz_sequences, lipschitz_iters)
    if compare_model is not None:
        check_comparable(model, compare_model)
    accs = _trace_batches(model, batches, T, device, ctx, cka_tokens, pca_tokens, token_labels)
    plan = model.loop_plan
    units = [_unit_result(blocks, g, acc, T)
             for blocks, g, acc in zip(plan.units, plan.unit_groups, accs)]
    ev = {"device": device, "ctx": ctx}
    exit_run = evaluate(
        model, batches, num_loops=T, loop_exit=True, exit_threshold=exit_threshold, **ev
    )
    for unit, its in zip(units, exit_run.iterations):
        unit["exit_histogram"] = _histogram(its, T)
    sweep = set(_default_thresholds(accs, T) if thresholds is None else thresholds)
    scaling = loop_scaling(model, batches, counts, **ev)
    extra = {"dynamics": loop_dynamics(model, batches, num_loops, fate_factor,
                                       lipschitz_sequences, lipschitz_iters, **ev)}
    if compare_model is not None:
        extra["loop_against_layer"] = loop_against_layer(
            model, compare_model, batches, num_loops=num_loops, cka_tokens=cka_tokens, **ev
        )
    return jsonable({
        **_describe(model, batches, T),
        "model_loss": _model_loss(model, batches, T, scaling, **ev),
        "units": units,
        "exit": {"threshold": exit_threshold, **exit_run.to_dict()},
        "exit_sweep": exit_sweep(model, batches, sweep | {exit_threshold}, T, **ev),
        "loop_scaling": scaling,
        **extra,
    })


def _describe(model: GPT, batches, T: int) -> dict:
    """The settings part of an `analyze_model` result."""
    cfg, plan = model.config, model.loop_plan
    return {
        "num_loops": T,
        "trained_loops": cfg.max_loops,
        "model_config": cfg.to_dict(),
        "tied_looping": cfg.tied_looping,
        "looped_blocks": [plan.start, plan.stop - 1],
        "loop_groups": [[g.first, g.last, g.count] for g in plan.groups],
        "batches": len(batches),
        "tokens_per_batch": list(batches[0][0].shape),
    }


def check_dynamics_options(config, fate_factor, lipschitz_sequences, lipschitz_iters) -> None:
    """AnalysisError unless the dynamics options are integers in their ranges
    (`DYNAMICS_LIMITS`) and fate_factor x the largest trained count is a count models can run."""
    values = {"fate_factor": fate_factor, "lipschitz_sequences": lipschitz_sequences,
              "lipschitz_iters": lipschitz_iters}
    for key, value in values.items():
        low, high = DYNAMICS_LIMITS[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise AnalysisError(f"{key}={value!r}: must be an integer in [{low}, {high}]")
    top = max(trained_counts(config))
    if fate_factor * top > MAX_LOOPS_LIMIT:
        raise AnalysisError(
            f"fate_factor={fate_factor}: {fate_factor} x the trained count {top} exceeds the "
            f"iteration limit {MAX_LOOPS_LIMIT}"
        )


# ----------------------------------------------------------------------------------------------
# loop against layer: the iterates of a looped model against a plain model's block outputs


def plain_block_outputs(model: GPT, idx) -> torch.Tensor:
    """The residual streams h_0 .. h_n of a plain model on token ids idx (B, L): h_0 is the
    embedding (`GPT.embed`), h_i the output of block i-1; (n_layer+1, B, L, C)."""
    x = model.embed(idx)
    outputs = [x]
    for block in model.transformer.h:
        x = block(x)
        outputs.append(x)
    return torch.stack(outputs)


def check_comparable(looped: GPT, plain: GPT, name: str = "the plain run") -> None:
    """AnalysisError unless `plain` is a plain model that reads the same tokens as `looped`
    (same vocab_size and block_size), so both can see the same idx."""
    if plain.looper is not None:
        raise AnalysisError(f"{name} loops; --compare_to needs a plain run (loop_center_idx=-1)")
    for key in ("vocab_size", "block_size"):
        a, b = getattr(looped.config, key), getattr(plain.config, key)
        if a != b:
            raise AnalysisError(
                f"{name} has {key}={b} but the looped model has {key}={a}; both must read the "
                "same token ids"
            )


def matched_layers(config, num_loops=None) -> list[list[int]]:
    """Per looped unit, the depth of each iterate s_0 .. s_T in the unrolled stack: the number
    of blocks applied before it (s_0 of a unit whose first block is b, after earlier units added
    e extra applications, sits at b + e; each iteration adds len(unit)). A depth-matched plain
    model's h_d is where iterate t would sit if the loop imitated depth."""
    plan = LoopPlan.from_config(config)
    counts, extra, out = plan.counts(num_loops), 0, []
    for g, unit in plan.unit_list:
        base, T = unit[0] + extra, counts[g]
        out.append([base + t * len(unit) for t in range(T + 1)])
        extra += len(unit) * (T - 1)
    return out


def _best(row: torch.Tensor) -> tuple:
    """(argmax, max) of a CKA row ignoring NaN; (None, None) if it is all NaN."""
    finite = torch.nan_to_num(row, nan=-math.inf)
    if not bool(torch.isfinite(finite).any()):
        return None, None
    j = int(finite.argmax())
    return j, float(row[j])


def _layer_unit(cka: torch.Tensor, unit: tuple, matched: list[int]) -> dict:
    """The per-unit entry of `loop_against_layer` from its (T+1, n+1) CKA matrix."""
    g, blocks = unit
    n = cka.shape[1] - 1
    best = [_best(row) for row in cka]
    return {
        "group": g, "blocks": list(blocks), "cka": cka.tolist(),
        "best_layer": [b for b, _ in best], "best_cka": [v for _, v in best],
        "matched_layer": [d if d <= n else None for d in matched],
        "matched_cka": [float(cka[t, d]) if d <= n else None for t, d in enumerate(matched)],
    }


@torch.no_grad()
def loop_against_layer(
    looped_model: GPT, plain_model: GPT, batches, device="cpu", *, num_loops=None, ctx=None,
    cka_tokens: int = DEFAULT_CKA_TOKENS,
) -> dict:
    """Linear CKA (Kornblith et al. 2019; `dynamics.cka_across`) between each iterate s_0 .. s_T
    of every looped unit of `looped_model` and each block output h_0 (embedding) .. h_n of
    `plain_model`, on the same tokens: both models see the same idx of `batches` ((x, y) int64
    (B, L)); `cka_tokens` token positions (spread over the batches, seeded) are compared. Eval
    mode, `num_loops` iterations (None: the trained counts), no automatic exit, autocast `ctx`.

    Returns {"plain_n_layer", "looped_effective_depth", "tokens", "units": [{"group", "blocks",
    "cka": (T+1, n+1) nested lists in [0, 1] (None where a representation is constant),
    "best_layer"/"best_cka" per iterate, "matched_layer"/"matched_cka": the layer at the
    iterate's depth in the unrolled stack (`matched_layers`; None beyond the plain model)}]}. If
    iterate t lines up with its matched layer the loop imitates depth; if not, it computes
    something else. Raises AnalysisError if `plain_model` loops or reads other tokens
    (`check_comparable`), or the looped model has no loop.
    """
    check_comparable(looped_model, plain_model)
    looped = tracing_copy(looped_model)
    _require_trace(looped)
    gen = torch.Generator().manual_seed(ANALYSIS_SEED)
    per_batch = math.ceil(cka_tokens / max(len(batches), 1))
    iterates, layers = [[] for _ in looped.loop_plan.units], []
    with eval_mode(looped), eval_mode(plain_model), (nullcontext() if ctx is None else ctx):
        for x, _ in batches:
            x = x.to(device)
            looped(x, num_loops=num_loops, loop_exit=False)
            rows = _pick_rows(x.numel(), per_batch, gen).to(device)
            for acc, unit in zip(iterates, looped.last_loop_trace.units):
                acc.append(unit.states.flatten(1, 2)[:, rows].float().cpu())
            layers.append(plain_block_outputs(plain_model, x).flatten(1, 2)[:, rows].float().cpu())
    h = torch.cat(layers, dim=1)
    matched = matched_layers(looped.config, num_loops)
    units = [_layer_unit(cka_across(torch.cat(acc, dim=1), h), unit, m)
             for acc, unit, m in zip(iterates, looped.loop_plan.unit_list, matched)]
    return {"plain_n_layer": plain_model.config.n_layer,
            "looped_effective_depth": effective_depth(looped.config, num_loops),
            "tokens": int(h.shape[1]), "units": units}


# ----------------------------------------------------------------------------------------------
# figures and report


def _nan(values) -> np.ndarray:
    """Nested lists from the result as a float array; numpy turns None (undefined) into NaN."""
    return np.array(values, dtype=float)


def _unit_label(unit: dict) -> str:
    b = unit["blocks"]
    blocks = f"block {b[0]}" if len(b) == 1 else f"blocks {b[0]}-{b[-1]}"
    return f"group {unit['group']}, {blocks}" if unit.get("group") else blocks


def _new_figure(width=6.4, height=4.2):
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    fig.savefig(path, bbox_inches="tight")


def _new_axes():
    """A default-sized figure with one set of axes: (fig, ax)."""
    fig = _new_figure()
    return fig, fig.subplots()


def _finish(fig, ax, path: Path, grid_axis: str = "both", **labels) -> None:
    """Label `ax` (xlabel, ylabel, title), add the grid and legend, and save `fig` to `path`."""
    ax.set(**labels)
    ax.grid(alpha=0.3, axis=grid_axis)
    ax.legend(fontsize=8)
    _save(fig, path)


def _plot_dynamics(res, path):
    fig = _new_figure(11, 4.2)
    ax_d, ax_c = fig.subplots(1, 2)
    for k, unit in enumerate(res["units"]):
        color = f"C{k}"
        t = np.arange(1, res["num_loops"] + 1)
        mean, std = _nan(unit["delta_mean"]), _nan(unit["delta_std"])
        ax_d.plot(t, mean, "o-", color=color, label=_unit_label(unit))
        ax_d.fill_between(t, np.clip(mean - std, 1e-12, None), mean + std, color=color, alpha=0.2)
        ax_c.plot(t, _nan(unit["cos_prev_mean"]), "o-", color=color,
                  label=f"{_unit_label(unit)}: cos(s_t, s_t-1)")
        ax_c.plot(np.arange(res["num_loops"] + 1), _nan(unit["cos_final_mean"]), "s--",
                  color=color, label=f"{_unit_label(unit)}: cos(s_t, s_T)")
    ax_d.axhline(res["exit"]["threshold"], color="gray", ls=":", label="exit threshold")
    ax_d.set_yscale("log")
    ax_d.set(xlabel="iteration t", ylabel="relative change delta_t",
             title="Relative change per iteration")
    ax_c.set(xlabel="iteration t", ylabel="mean cosine similarity over tokens",
             title="Cosine to previous and to final state")
    for ax in (ax_d, ax_c):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _plot_norm(res, path):
    fig, ax = _new_axes()
    t = np.arange(res["num_loops"] + 1)
    for k, unit in enumerate(res["units"]):
        mean, std = _nan(unit["norm_mean"]), _nan(unit["norm_std"])
        ax.plot(t, mean, "o-", color=f"C{k}", label=_unit_label(unit))
        ax.fill_between(t, mean - std, mean + std, color=f"C{k}", alpha=0.2)
    _finish(fig, ax, path, xlabel="iteration t (0 = loop input)",
            ylabel="L2 norm of token state", title="State norm per iteration")


def _plot_logit_lens(res, path):
    fig, ax = _new_axes()
    t = np.arange(res["num_loops"] + 1)
    for k, unit in enumerate(res["units"]):
        ax.plot(t, _nan(unit["logit_lens_loss"]), "o-", color=f"C{k}",
                label=f"{_unit_label(unit)}: rest of model runs")
        ax.plot(t, _nan(unit["logit_lens_direct_loss"]), "x--", color=f"C{k}",
                label=f"{_unit_label(unit)}: direct (ln_f + head)")
    if res["model_loss"] is not None:  # None: the model's own loss diverged (non-finite)
        ax.axhline(res["model_loss"], color="gray", ls=":", label="model loss")
    _finish(fig, ax, path, xlabel="iteration t (0 = loop skipped)", ylabel="validation loss",
            title="Logit lens: loss if the loop stopped at t")


def _plot_exit_histogram(res, path):
    fig, ax = _new_axes()
    units = res["units"]
    t = np.arange(1, res["num_loops"] + 1)
    width = 0.8 / len(units)
    for k, unit in enumerate(units):
        ax.bar(t + (k - (len(units) - 1) / 2) * width, unit["exit_histogram"], width=width,
               color=f"C{k}", label=_unit_label(unit))
    ax.set_xticks(t)
    _finish(fig, ax, path, grid_axis="y",
            xlabel=f"iterations run (at {res['num_loops']}, the cap, also those that never exited)",
            ylabel="sequences",
            title=f"Automatic exit at threshold {res['exit']['threshold']:g} "
                  f"(mean {res['exit']['mean_iterations']:.2f} iterations)")


def _plot_exit_sweep(res, path):
    fig, ax = _new_axes()
    sweep = res["exit_sweep"]
    xs = [p["mean_iterations"] for p in sweep]
    ys = _nan([p["loss"] for p in sweep])
    ax.plot(xs, ys, "o-", color="C0", label="automatic exit (threshold labelled)")
    # Thresholds that no sequence distinguishes land on one point: one label per point.
    groups = {}
    for p, y in zip(sweep, ys):
        groups.setdefault((round(p["mean_iterations"], 6), round(float(y), 6)), []).append(
            p["threshold"]
        )
    for (x, y), thrs in groups.items():
        text = f"{thrs[0]:g}" if len(thrs) == 1 else f"{min(thrs):g}..{max(thrs):g}"
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    fixed = [p for p in res["loop_scaling"] if p["num_loops"] <= res["num_loops"]]
    ax.plot([p["num_loops"] for p in fixed], _nan([p["loss"] for p in fixed]), "s--",
            color="C1", label="fixed iteration count")
    _finish(fig, ax, path, xlabel="mean iterations used", ylabel="validation loss",
            title="Loss against compute: exit thresholds vs fixed counts")


def _plot_pca(res, path):
    units = res["units"]
    fig = _new_figure(5.2 * len(units), 4.6)
    axes = np.atleast_1d(fig.subplots(1, len(units)))
    for ax, unit in zip(axes, units):
        pca = unit["pca"]
        traj = _nan(pca["trajectories"])
        for j, tok in enumerate(pca["tokens"]):
            color = f"C{j % 10}"
            xy = traj[:, j, :]
            ax.plot(xy[:, 0], xy[:, 1], "-", color=color, alpha=0.8, label=tok["label"])
            # One arrowhead per step so the direction of travel is visible.
            for a, b in zip(xy[:-1], xy[1:]):
                ax.annotate("", xy=b, xytext=a,
                            arrowprops=dict(arrowstyle="-|>", color=color, lw=1.2,
                                            mutation_scale=10, shrinkA=0, shrinkB=0))
            ax.plot(xy[0, 0], xy[0, 1], "o", color=color, ms=6)
            ax.plot(xy[-1, 0], xy[-1, 1], "s", color=color, ms=6)
        ratio = pca["explained_variance_ratio"]
        ax.set(xlabel=f"PC1 ({100 * ratio[0]:.0f}% of variance)",
               ylabel=f"PC2 ({100 * ratio[1]:.0f}% of variance)" if len(ratio) > 1 else "PC2",
               title=f"{_unit_label(unit)}: token trajectories\n(circle: s_0, square: s_T)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    _save(fig, path)


def _plot_cka(res, path):
    units = res["units"]
    fig = _new_figure(4.8 * len(units) + 1, 4.2)
    axes = np.atleast_1d(fig.subplots(1, len(units)))
    n = res["num_loops"] + 1
    # One colour scale for all units, starting just below the smallest value: CKA between
    # iterations is often above 0.8, and a 0..1 scale would show a uniform block.
    lowest = np.nanmin([np.nanmin(_nan(u["cka"])) for u in units])
    vmin = min(np.floor(10 * lowest) / 10, 0.9) if np.isfinite(lowest) else 0.0
    for ax, unit in zip(axes, units):
        m = _nan(unit["cka"])
        im = ax.imshow(m, vmin=vmin, vmax=1, cmap="viridis", origin="upper")
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    dark = (m[i, j] - vmin) / (1 - vmin) < 0.5  # viridis is dark below mid
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
        step = math.ceil(n / 9)  # at most 9 tick labels, so two-digit ones do not collide
        ax.set_xticks(range(0, n, step))
        ax.set_yticks(range(0, n, step))
        ax.set(xlabel="iteration t'", ylabel="iteration t", title=f"{_unit_label(unit)}: linear CKA")
    fig.colorbar(im, ax=list(axes), label="linear CKA", shrink=0.9)
    _save(fig, path)


def _plot_loop_scaling(res, path):
    fig, ax = _new_axes()
    pts = res["loop_scaling"]
    ax.plot([p["num_loops"] for p in pts], _nan([p["loss"] for p in pts]), "o-", color="C0",
            label="validation loss")
    ax.axvline(res["trained_loops"], color="gray", ls="--",
               label=f"trained count ({res['trained_loops']})")
    ax.set_xscale("log", base=2)
    ax.set_xticks([p["num_loops"] for p in pts])
    ax.set_xticklabels([str(p["num_loops"]) for p in pts])
    _finish(fig, ax, path, xlabel="iterations at test time", ylabel="validation loss",
            title="Test-time loop scaling")


# ---- loop dynamics figures (result["dynamics"], result["loop_against_layer"])

DYNAMICS_PANELS = (
    ("step_norm", "step norm ||s_t - s_(t-1)||", True),
    ("delta", "relative change delta_t", True),
    ("cos", "cos(step t, step t-1)", False),
    ("lipschitz", "Lipschitz constant at s_(t-1)", False),
)
LENS_PANELS = (
    ("lens_loss", "logit-lens loss (nats)", False),
    ("lens_entropy", "logit-lens entropy (nats)", False),
    ("lens_kl_prev", "KL(p_t || p_(t-1)) (nats)", True),
)


# Tick labels such as 0.25 rather than 2.5 x 10^-1 on log axes spanning less than a decade.
_SHORT = FuncFormatter(lambda v, _: f"{v:.2g}")


def _band(ax, rows: list[dict], key: str, color: str, log: bool) -> None:
    """Mean of `key` over iterations with its bootstrap interval as a band. Non-finite values
    (None in the result: undefined or diverged) are not drawn; where a diverged run left gaps
    after defined values, the panel says so."""
    t = np.array([r["t"] for r in rows])
    mean, low, high = (_nan([r[key][part] for r in rows]) for part in ("mean", "low", "high"))
    if log:  # a log axis cannot show values <= 0
        mean, low, high = (np.where(v > 0, v, np.nan) for v in (mean, low, high))
    ax.plot(t, mean, "o-", color=color, ms=3.5)
    ax.fill_between(t, low, high, color=color, alpha=0.25, lw=0)
    defined = np.flatnonzero(np.isfinite(mean))
    if defined.size and not np.isfinite(mean[defined[0]:]).all():
        ax.text(0.02, 0.02, "non-finite values not drawn", transform=ax.transAxes,
                color="red", fontsize=8)
    if log and defined.size:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_SHORT)
        # Minor ticks are labelled only within a decade, where there are no major ones.
        shown = np.concatenate([v[np.isfinite(v)] for v in (mean, low, high)])
        narrow = shown.max() < 10 * shown.min()
        ax.yaxis.set_minor_formatter(_SHORT if narrow else NullFormatter())


def _panel_grid(res, panels, path, title: str, lipschitz_line: bool = False) -> None:
    """One row per looped unit, one column per panel of (key, label, log y)."""
    units = res["dynamics"]["units"]
    fig = _new_figure(3.4 * len(panels), 2.7 * len(units) + 0.5)
    axes = np.array(fig.subplots(len(units), len(panels), squeeze=False))
    for i, unit in enumerate(units):
        for j, (key, label, log) in enumerate(panels):
            ax = axes[i, j]
            _band(ax, unit["rows"], key, f"C{i}", log)
            if lipschitz_line and key == "lipschitz":
                ax.axhline(1.0, color="gray", ls="--", lw=1, label="1: contraction boundary")
                ax.legend(fontsize=7, loc="best")
            ax.set_title(f"{_unit_label(unit)}: {label}" if len(units) > 1 else label, fontsize=9)
            ax.set_xticks(range(0, unit["num_loops"] + 1, math.ceil((unit["num_loops"] + 1) / 9)))
            ax.grid(alpha=0.3)
            if i == len(units) - 1:
                ax.set_xlabel("iteration t")
    dyn = res["dynamics"]
    fig.suptitle(f"{title} (mean over {dyn['sequences']} sequences, band = "
                 f"{100 * dyn['confidence']:.0f}% bootstrap interval)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _plot_loop_dynamics(res, path):
    _panel_grid(res, DYNAMICS_PANELS, path, "Loop dynamics", lipschitz_line=True)


def _plot_loop_lens(res, path):
    lens = res["dynamics"]["lens"]
    _panel_grid(res, LENS_PANELS, path, f"Logit lens ({lens}) per iteration")


def _fate_label(unit: dict) -> str:
    fate = unit["fate"]
    if "skipped" in fate:
        return f"{_unit_label(unit)}\n(skipped)"
    periods = ", ".join(f"{p}: {n}" for p, n in fate["cycle_periods"].items())
    text = f"{_unit_label(unit)}, T={fate['num_loops']}"
    return f"{text}\ncycle periods {periods}" if periods else text


def _plot_fates(ax, units) -> None:
    """Stacked horizontal bars: the fraction of tokens per fate, one bar per unit."""
    colors = {"fixed_point": "C2", "cycle": "C1", "diverging": "C3", "wandering": "C7"}
    left = np.zeros(len(units))
    for fate in FATES:
        widths = np.array([u["fate"].get("fractions", {}).get(fate, 0.0) or 0.0 for u in units])
        ax.barh(range(len(units)), widths, left=left, color=colors[fate], height=0.5,
                label=fate.replace("_", " "))
        for k, (w, l0) in enumerate(zip(widths, left)):
            if w >= 0.08:
                ax.text(l0 + w / 2, k, f"{100 * w:.0f}%", ha="center", va="center", fontsize=8)
        left += widths
    ax.set_yticks(range(len(units)))
    ax.set_yticklabels([_fate_label(u) for u in units], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(len(units) - 0.2, -0.8)  # first unit on top; bars half a row high
    ax.set(xlabel="fraction of tokens", title="Trajectory fate after long runs")
    ax.legend(fontsize=7, loc="lower right", framealpha=0.9)


def _plot_box_counting(ax, units) -> None:
    """log N(eps) against log(1/eps) per unit, with the least-squares line over the fit range."""
    for k, unit in enumerate(units):
        box = unit["fate"].get("box_counting") or {}
        if box.get("dimension") is None:
            ax.plot([], [], color=f"C{k}",
                    label=f"{_unit_label(unit)}: n/a ({box.get('reason', 'skipped')})"[:70])
            continue
        x, y = -_nan(box["log_eps"]), _nan(box["log_counts"])
        slope, icept = np.polyfit(x, y, 1)
        low, high = box["fit_range"]
        ax.plot(x, y, "o", color=f"C{k}")
        ax.plot(x, slope * x + icept, "-", color=f"C{k}",
                label=f"{_unit_label(unit)}: D = {box['dimension']:.2f} "
                      f"(box side {low:.3g} to {high:.3g})")
    ax.set(xlabel="log(1 / box side)", ylabel="log(occupied boxes)",
           title="Box counting on PCA-projected trajectories")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _plot_loop_fates(res, path):
    units = res["dynamics"]["units"]
    fig = _new_figure(12, 1.0 * len(units) + 3.2)
    ax_f, ax_b = fig.subplots(1, 2)
    _plot_fates(ax_f, units)
    _plot_box_counting(ax_b, units)
    fig.suptitle(f"Long runs: {res['dynamics']['fate_factor']} x the trained iteration count",
                 fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _plot_loop_vs_layer(res, path):
    cmp_ = res["loop_against_layer"]
    units = cmp_["units"]
    fig = _new_figure(4.0 + 0.45 * (cmp_["plain_n_layer"] + 1) * len(units), 4.4)
    axes = np.atleast_1d(fig.subplots(1, len(units)))
    for ax, unit in zip(axes, units):
        m = _nan(unit["cka"])
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", origin="upper", aspect="auto")
        rows, cols = m.shape
        if rows * cols <= 200:
            for i in range(rows):
                for j in range(cols):
                    ax.text(j, i, "" if np.isnan(m[i, j]) else f"{m[i, j]:.2f}", ha="center",
                            va="center", fontsize=7, color="white" if m[i, j] < 0.5 else "black")
        for t, d in enumerate(unit["matched_layer"]):
            if d is not None:
                ax.add_patch(Rectangle((d - 0.5, t - 0.5), 1, 1, fill=False, ec="red", lw=2.2))
        for t, b in enumerate(unit["best_layer"]):
            if b is not None:
                ax.add_patch(Rectangle((b - 0.36, t - 0.36), 0.72, 0.72, fill=False,
                                       ec="white", lw=1.2, ls="--"))
        ax.plot([], [], "s", mfc="none", mec="red", mew=2, label="depth-matched layer")
        ax.plot([], [], "s", mfc="none", mec="gray", ls="none", label="best layer (dashed)")
        ax.set_xticks(range(cols))
        ax.set_yticks(range(rows))
        ax.set(xlabel="plain model layer (0 = embedding)", ylabel="loop iterate t",
               title=f"{_unit_label(unit)}: linear CKA")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.colorbar(im, ax=list(axes), label="linear CKA", shrink=0.9)
    _save(fig, path)


_PLOTTERS = {
    "dynamics": _plot_dynamics,
    "norm": _plot_norm,
    "logit_lens": _plot_logit_lens,
    "exit_histogram": _plot_exit_histogram,
    "exit_sweep": _plot_exit_sweep,
    "pca": _plot_pca,
    "cka": _plot_cka,
    "loop_scaling": _plot_loop_scaling,
    "loop_dynamics": _plot_loop_dynamics,
    "loop_lens": _plot_loop_lens,
    "loop_fates": _plot_loop_fates,
    "loop_vs_layer": _plot_loop_vs_layer,
}


def _fmt(v, spec=".4f", missing="n/a") -> str:
    return missing if v is None else format(v, spec)


def _loss(v) -> str:
    """A loss for the report; None in the result means it was not finite: the run diverged."""
    return _fmt(v, missing="diverged (non-finite)")


def report_figures(result: dict) -> dict:
    """The figures of a result: FIGURES (the loop-dynamics ones where it has "dynamics") and
    COMPARE_FIGURES where it has "loop_against_layer"; name -> (file name, how to read it)."""
    out = {k: v for k, v in FIGURES.items()
           if not k.startswith("loop_") or k == "loop_scaling" or "dynamics" in result}
    if "loop_against_layer" in result:
        out.update(COMPARE_FIGURES)
    return out


def _ci(cell: dict, spec: str = ".3g") -> str:
    """'mean [low, high]' of a bootstrap cell; n/a where undefined, 'non-finite' where the mean
    is missing but values were counted (a diverged run)."""
    if cell["mean"] is None:
        return "non-finite" if cell.get("n") else "n/a"
    if cell["low"] is None or cell["high"] is None:
        return format(cell["mean"], spec)
    return f"{cell['mean']:{spec}} [{cell['low']:{spec}}, {cell['high']:{spec}}]"


DYNAMICS_COLUMNS = (("step_norm", "step norm"), ("delta", "delta_t"), ("cos", "cos of steps"),
                    ("state_norm", "state norm"), ("lipschitz", "Lipschitz"),
                    ("lens_loss", "lens loss"), ("lens_entropy", "lens entropy"),
                    ("lens_kl_prev", "KL to t-1"))


def _fate_text(fate: dict) -> str:
    if "skipped" in fate:
        return f"- fates at {fate['num_loops']} iterations: skipped ({fate['skipped']})"
    fractions = ", ".join(f"{k.replace('_', ' ')} {100 * v:.1f}%"
                          for k, v in fate["fractions"].items())
    periods = ", ".join(f"period {p}: {n}" for p, n in fate["cycle_periods"].items()) or "none"
    box = fate["box_counting"]
    if box["dimension"] is None:
        dim = f"n/a ({box.get('reason')})"
    else:
        dim = (f"{box['dimension']:.2f}, fit over box sides {box['fit_range'][0]:.3g} to "
               f"{box['fit_range'][1]:.3g} (PCA units), {box['points']} points")
    return (f"- fates of {fate['tokens']} tokens at {fate['num_loops']} iterations: {fractions}; "
            f"cycles: {periods}\n- box-counting dimension of the PCA-projected trajectories: {dim}")


def _dynamics_markdown(res: dict) -> list[str]:
    dyn = res["dynamics"]
    lip = dyn["lipschitz"]
    lines = [
        "## Loop dynamics", "",
        f"Mean over {dyn['sequences']} validation sequences (each first averaged over its tokens) "
        f"with a {100 * dyn['confidence']:.0f}% bootstrap interval ({dyn['bootstrap']['method']}, "
        f"{dyn['bootstrap']['n_resamples']} resamples of the sequences). Norms in the residual "
        f"stream's units; lens quantities in nats (logit lens: {dyn['lens']}). Lipschitz: "
        f"largest singular value of the Jacobian of the iteration map at s_(t-1), on "
        f"{lip['sequences']} sequences, power iteration with at most "
        f"{lip['max_power_iterations']} rounds (tol {lip['tol']:g}).", "",
    ]
    header = "| t | " + " | ".join(name for _, name in DYNAMICS_COLUMNS) + " |"
    for unit in dyn["units"]:
        lines += [f"### {_unit_label(unit)}", "", header,
                  "|---:|" + "---:|" * len(DYNAMICS_COLUMNS)]
        lines += [f"| {row['t']} | " + " | ".join(_ci(row[k]) for k, _ in DYNAMICS_COLUMNS) + " |"
                  for row in unit["rows"]]
        lines += ["", _fate_text(unit["fate"]), ""]
    return lines


def _layer_markdown(res: dict) -> list[str]:
    cmp_ = res["loop_against_layer"]
    lines = ["## Loop against layer", "",
             f"Linear CKA on {cmp_['tokens']} tokens against a plain model with "
             f"{cmp_['plain_n_layer']} blocks (the looped model's effective depth is "
             f"{cmp_['looped_effective_depth']}).", ""]
    for unit in cmp_["units"]:
        lines += [f"### {_unit_label(unit)}", "",
                  "| iterate t | depth-matched layer | CKA there | best layer | its CKA |",
                  "|---:|---:|---:|---:|---:|"]
        for t, (d, dc, b, bc) in enumerate(zip(unit["matched_layer"], unit["matched_cka"],
                                               unit["best_layer"], unit["best_cka"])):
            lines.append(f"| {t} | {_fmt(d, 'd')} | {_fmt(dc, '.3f')} | {_fmt(b, 'd')} | "
                         f"{_fmt(bc, '.3f')} |")
        lines.append("")
    return lines


def _markdown(res: dict, header: dict) -> str:
    lines = ["# Loop analysis", ""]
    for key, value in header.items():
        lines.append(f"- {key}: {value}")
    lines += [
        "- loop groups "
        + ", ".join(f"blocks {a}-{b} (trained at {n})" for a, b, n in res["loop_groups"])
        + f" ({'tied' if res['tied_looping'] else 'untied'}), analysed at {res['num_loops']} "
        "iterations",
        f"- {res['batches']} validation batches of shape {res['tokens_per_batch']}; "
        f"model loss {_loss(res['model_loss'])}",
        f"- automatic exit at threshold {res['exit']['threshold']:g}: loss "
        f"{_loss(res['exit']['loss'])} with {res['exit']['mean_iterations']:.2f} mean iterations",
        "",
        "All numbers are in `analysis.json`.",
        "",
        "## Test-time loop scaling",
        "",
        "| iterations | loss | accuracy |",
        "|---:|---:|---:|",
    ]
    lines += [
        f"| {p['num_loops']} | {_loss(p['loss'])} | {_fmt(p['accuracy'])} |"
        for p in res["loop_scaling"]
    ]
    lines += ["", "## Exit threshold sweep", "", "| threshold | mean iterations | loss |",
              "|---:|---:|---:|"]
    lines += [
        f"| {p['threshold']:g} | {p['mean_iterations']:.2f} | {_loss(p['loss'])} |"
        for p in res["exit_sweep"]
    ]
    lines.append("")
    if "dynamics" in res:
        lines += _dynamics_markdown(res)
    if "loop_against_layer" in res:
        lines += _layer_markdown(res)
    lines += ["## Figures", ""]
    for name, (filename, sentence) in report_figures(res).items():
        lines += [f"### {name.replace('_', ' ')}", "", f"![{name}]({filename})", "", sentence, ""]
    return "\n".join(lines)


def write_report(result: dict, report_dir, header: dict | None = None) -> dict:
    """Write `analysis.json`, the PNG figures and `analysis.md` for an `analyze_model` result.

    `header` (name -> value) is listed at the top of the Markdown and stored in the JSON.
    Returns {"json": path, "markdown": path, "figures": {name: path}}.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    figures = {}
    for name, (filename, _) in report_figures(result).items():
        _PLOTTERS[name](result, report_dir / filename)
        figures[name] = str(report_dir / filename)
    header = header or {}
    payload = {**jsonable(header), **result, "figures": {k: Path(v).name for k, v in figures.items()}}
    json_path = report_dir / "analysis.json"
    atomic_write_json(json_path, payload)
    md_path = report_dir / "analysis.md"
    md_path.write_text(_markdown(result, header))
    return {"json": str(json_path), "markdown": str(md_path), "figures": figures}


# ----------------------------------------------------------------------------------------------
# checkpoints


def _load_looped(path: Path, device: str) -> tuple[GPT, dict]:
    """The checkpoint's model with the loop trace on, in eval mode on `device`, and its payload.
    Raises CheckpointError if it cannot be read, AnalysisError if the model does not loop."""
    model, payload = load_model(path, device, loops_representation=True)
    if not is_looped(model.config):
        raise AnalysisError(
            f"{path} holds a model without looping (loop_center_idx=-1); there is no loop to "
            f"analyse"
        )
    return model, payload


def _compare_checkpoint(compare_to) -> Path:
    """The checkpoint file (best.pt, else last.pt) of the plain run `compare_to`; AnalysisError
    naming --compare_to if it is not a run directory."""
    if not Path(compare_to).is_dir():
        raise AnalysisError(f"compare_to {str(compare_to)!r} does not exist or is not a directory")
    try:
        return find_run_checkpoint(compare_to, "auto")
    except CheckpointError as e:
        raise AnalysisError(f"compare_to: {e}") from None


def _load_plain(path: Path, device: str, looped: GPT) -> GPT:
    """The plain model of checkpoint `path` in eval mode on `device`, checked against `looped`
    (`check_comparable`). Raises CheckpointError or AnalysisError."""
    plain, _ = load_model(path, device)
    check_comparable(looped, plain, name=f"compare_to {path}")
    return plain


def compare_runs(looped_dir, plain_dir, batches: int = 2, device: str = "cpu") -> dict:
    """`loop_against_layer` between the checkpoints (last.pt) of a looped run and a plain run,
    on the first `batches` fixed validation batches of the looped run's data (the experiment
    report's heatmap). Raises a BlockloopError (CheckpointError, DataError, AnalysisError)."""
    looped, payload = load_model(find_run_checkpoint(looped_dir, "last"), device)
    plain = _load_plain(find_run_checkpoint(plain_dir, "last"), device, looped)
    cfg = _train_config(payload, batches, None)
    val, _ = _validation_data(cfg, batches, payload.get("meta") or {})
    return loop_against_layer(looped, plain, val, device=device)


def _train_config(payload: dict, batches: int, data_dir: str | None) -> TrainConfig:
    """The run's TrainConfig (keys this version knows), with `data_dir` if given and at most
    `batches` evaluation batches. Raises ConfigError if it is not valid here."""
    known = {f.name for f in fields(TrainConfig)}
    tc = {k: v for k, v in payload.get("train_config", {}).items() if k in known}
    cfg = TrainConfig(**tc)
    if data_dir is not None:
        cfg = replace(cfg, data_dir=data_dir)
    # Token-dataset evaluation batch k depends on k alone, so fewer eval_iters gives the same
    # first batches without generating the rest.
    cfg = replace(cfg, eval_iters=min(cfg.eval_iters, batches))
    cfg.validate()
    return cfg


def _validation_data(cfg: TrainConfig, batches: int, checkpoint_meta: dict):
    """The first `batches` fixed validation batches of the run's data, and a token namer.
    Raises DataError if the data no longer decodes like the data the model was trained on."""
    data = TrainingData(cfg)
    data.check_trained_on(checkpoint_meta)
    val = data.eval_batches("val")[:batches]
    itos = data.meta.get("tokenizer", {}).get("itos")
    namer = (lambda i: repr(itos[i]) if i < len(itos) else str(i)) if itos else None
    return val, namer


def _run_dtype(cfg: TrainConfig, device: str) -> str:
    """The run's compute dtype on `device` (`runtime.resolve_dtype`), so analysis matches
    training; float32 where the device cannot run it (float16 on the CPU), as recorded in the
    result's `dtype`."""
    try:
        return resolve_dtype(cfg.dtype, device)
    except ConfigError:
        return "float32"


def analyze_checkpoint(
    out_dir,
    report_dir=None,
    num_loops: int | None = None,
    batches: int = 4,
    device="cpu",
    *,
    checkpoint: str = "auto",
    data_dir: str | None = None,
    thresholds=None,
    compare_to=None,
    fate_factor: int = DEFAULT_FATE_FACTOR,
    lipschitz_sequences: int = DEFAULT_LIPSCHITZ_SEQUENCES,
    lipschitz_iters: int = DEFAULT_LIPSCHITZ_ITERS,
) -> dict:
    """Analyse the checkpoint in `out_dir` (best.pt, else last.pt) on `batches` validation
    batches and write the report to `report_dir` (default `<out_dir>/analysis`).

    Every pass runs under the run's own autocast dtype (its train_config `dtype` resolved for
    `device`). `compare_to`: a plain run's out_dir (its best.pt, else last.pt), compared layer
    by layer with the loop (`loop_against_layer`); the dynamics options go to `analyze_model`.
    Returns the `analyze_model` result plus the header and the report's file paths (`report`).
    Raises a BlockloopError (AnalysisError, ConfigError for the device, CheckpointError,
    DataError) with a one-line reason when it cannot run, before any analysis.
    """
    if batches < 1:
        raise AnalysisError(f"batches={batches}: must be >= 1")
    device = resolve_device(device)
    compare_path = None if compare_to is None else _compare_checkpoint(compare_to)
    path = find_run_checkpoint(out_dir, checkpoint)
    model, payload = _load_looped(path, device)
    if num_loops is not None:
        _check_loops(model.config, num_loops)
    check_dynamics_options(model.config, fate_factor, lipschitz_sequences, lipschitz_iters)
    plain = None if compare_path is None else _load_plain(compare_path, device, model)
    cfg = _train_config(payload, batches, data_dir)
    dtype = _run_dtype(cfg, device)
    val, namer = _validation_data(cfg, batches, payload.get("meta") or {})
    result = analyze_model(
        model, val, num_loops=num_loops, device=device, ctx=autocast_context(device, dtype),
        thresholds=thresholds, token_labels=namer, fate_factor=fate_factor,
        lipschitz_sequences=lipschitz_sequences, lipschitz_iters=lipschitz_iters,
        compare_model=plain,
    )
    header = {
        "checkpoint": str(path),
        "iter_num": payload.get("iter_num"),
        "best_val_loss": payload.get("best_val_loss"),
        "dataset": payload.get("train_config", {}).get("dataset"),
        "dtype": dtype,
    }
    if compare_path is not None:
        header["compare_to"] = str(compare_path)
    out_dir = Path(out_dir)
    report = write_report(result, Path(report_dir) if report_dir else out_dir / "analysis", header)
    return {**jsonable(header), **result, "report": report}


# ----------------------------------------------------------------------------------------------
# command line


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers") from None
    if not values or any(not (math.isfinite(v) and v >= 0) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: thresholds must be finite numbers >= 0")
    return values


def _count(key: str):
    """An argparse type: an integer within DYNAMICS_LIMITS[key]."""
    low, high = DYNAMICS_LIMITS[key]

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: must be in [{low}, {high}]")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The `blockloop analyze` argument parser (options, defaults and help)."""
    parser = argparse.ArgumentParser(
        prog="blockloop analyze",
        description=(
            "Analyse what a looped model's representation does across loop iterations, on the "
            "fixed validation batches of its training data: relative change, cosines, norms, "
            "logit lens, exit iterations and a threshold sweep, PCA trajectories, CKA between "
            "iterations, and validation loss at other iteration counts; loop dynamics with "
            "95% bootstrap intervals over sequences (step norm, relative change, angle between "
            "steps, Lipschitz constant of the iteration map, logit-lens loss, entropy and KL, "
            "trajectory fates, box-counting dimension); with --compare_to, CKA of each iterate "
            "against each layer of a plain run. Writes analysis.json, PNG figures and "
            "analysis.md."
        ),
        epilog="example: blockloop analyze --out_dir=out-shakespeare-char-loop-tied --num_loops=8",
    )
    add = parser.add_argument
    add("--out_dir", required=True, help="training output directory holding best.pt/last.pt")
    add("--num_loops", type=int, default=None,
        help="iterations for the traced pass and the exit cap (default: the trained count)")
    add("--batches", type=int, default=4, help="validation batches to use (default: 4)")
    add("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, mps (default: cpu)")
    add("--report_dir", default=None,
        help="where to write the report (default: OUT_DIR/analysis)")
    add("--checkpoint", choices=("auto", "best", "last"), default="auto",
        help="which checkpoint (default: auto = best.pt if present, else last.pt)")
    add("--data_dir", default=None,
        help="token data directory, if it moved since training (default: the run's)")
    add("--thresholds", type=_thresholds, default=None,
        help="comma-separated exit thresholds for the sweep (default: "
             f"{','.join(f'{t:g}' for t in DEFAULT_THRESHOLDS)} plus quantiles of the observed "
             "relative changes)")
    add("--compare_to", default=None, metavar="DIR",
        help="a plain run's out_dir: linear CKA between each loop iterate and each of its block "
             "outputs (loop against layer)")
    add("--fate_factor", type=_count("fate_factor"), default=DEFAULT_FATE_FACTOR,
        help="trajectory fates after this many times the trained count of iterations "
             f"(default: {DEFAULT_FATE_FACTOR})")
    add("--lipschitz_sequences", type=_count("lipschitz_sequences"),
        default=DEFAULT_LIPSCHITZ_SEQUENCES,
        help="sequences on which the Lipschitz constant is estimated per iteration "
             f"(default: {DEFAULT_LIPSCHITZ_SEQUENCES})")
    add("--lipschitz_iters", type=_count("lipschitz_iters"), default=DEFAULT_LIPSCHITZ_ITERS,
        help=f"power iterations at most per estimate (default: {DEFAULT_LIPSCHITZ_ITERS})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`blockloop analyze`: 0 on success; a BlockloopError prints one `error: ...` line and
    returns its exit code (2 for bad input); argparse's usage errors return 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, message already printed)
        return int(e.code or 0)
    return run_command(lambda: _analyze_command(args))


def _analyze_command(args) -> int:
    result = analyze_checkpoint(
        args.out_dir, args.report_dir, args.num_loops, args.batches, args.device,
        checkpoint=args.checkpoint, data_dir=args.data_dir, thresholds=args.thresholds,
        compare_to=args.compare_to, fate_factor=args.fate_factor,
        lipschitz_sequences=args.lipschitz_sequences, lipschitz_iters=args.lipschitz_iters,
    )
    print(
        f"analysed {result['checkpoint']} at {result['num_loops']} iterations: model loss "
        f"{_loss(result['model_loss'])}; report in {result['report']['markdown']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
