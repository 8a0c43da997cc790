"""Loop dynamics: the mathematics of a looped unit seen as an iterated map s -> R(inject(s, x0)).

`blockloop.looping` defines the loop; `blockloop.analysis` measures what its states look like.
This module holds the dynamical-systems quantities the loop-dynamics analysis reports per looped
unit ("group") and iteration, written as pure functions on tensors so they can be tested against
independent computations and reused by any caller:

- `sigma_max`: the largest singular value of the Jacobian of a batched map, per batch row, by
  matrix-free power iteration (the local Lipschitz constant of the iteration map);
- `step_statistics`: step norm, relative change delta_t, angle between successive steps, norm;
- `lens_statistics`: logit-lens loss, entropy and KL between consecutive iterates' lens
  distributions, from logits the caller computes;
- `trajectory_fate`: per token, whether a long trajectory converged, cycled or diverged;
- `project_pca` and `box_counting_dimension`: the fractal dimension of projected trajectories;
- `cka_across`: linear CKA between two sets of representations of the same tokens;
- `bootstrap_ci`: bootstrap intervals over sequences (`blockloop.stats.bootstrap_interval`);
- `loop_dynamics`: all of the above for a model on validation batches, per looped unit.

Only `unit_inputs`, `iteration_map` and `_traced_units` know the loop runner's API
(`model.looper._step`, `model.loop_plan.units`, the trace layout); `jacobian_sigma_max` and
`loop_dynamics` are built from them. When the runner changes those are the functions to adapt. This module must
not import `blockloop.analysis` (analysis re-exports `jacobian_sigma_max` from here).

Logarithms are natural (losses, entropies and KL divergences are in nats).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from blockloop.evaluation import eval_mode
from blockloop.stats import bootstrap_interval

FATES = ("fixed_point", "cycle", "diverging", "wandering")
# Added to norms in denominators, as `blockloop.looping.relative_change` does.
NORM_EPS = 1e-6
TINY64 = torch.finfo(torch.float64).tiny


# ----------------------------------------------------------------------------------------------
# The Jacobian's largest singular value, matrix-free.


def _row_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each batch row over all its other dimensions: (B, ...) -> (B,)."""
    return x.flatten(1).norm(dim=1)


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> a shape that broadcasts against `like` (B, ...)."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def _start_vector(s: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    v = torch.randn(s.shape, generator=generator, dtype=torch.float64)
    v = v.to(device=s.device, dtype=s.dtype)
    return v / _per_row(_row_norm(v), v)


def sigma_max(
    f, s: torch.Tensor, iters: int = 100, tol: float = 1e-6, generator=None
) -> torch.Tensor:
    """Largest singular value of the Jacobian of `f` at `s`, per batch row: (B, ...) -> (B,).

    `f` maps a batch (B, L, C) to (B, L, C) (any trailing shape, as long as output and input
    match) and must treat rows independently, as transformer blocks do; its Jacobian is then
    block-diagonal and row b's block J_b (L*C x L*C) is the Jacobian of the map on that
    sequence's whole state. Power iteration on J_b^T J_b (von Mises; Golub & Van Loan, "Matrix
    Computations", sec. 7.3 and 8.2): v <- J^T J v / ||J^T J v||, with J v from a forward-mode
    Jacobian-vector product (`torch.func.jvp`) and J^T u from a vector-Jacobian product
    (`torch.func.vjp`, whose graph is built once), each row normalised on its own. The estimate
    is ||J_b v_b|| for the unit vector v_b, a lower bound that converges to sigma_max.

    The start vector is Gaussian, drawn from `generator` (default: a fresh generator seeded 0,
    so results are deterministic). Iteration stops after `iters` rounds, or earlier once every
    row's estimate changed by at most `tol` relative to itself since the previous round.

    Cost: one round is one jvp and one vjp of `f`, roughly 4-5 forward passes of `f`; the vjp
    graph (one pass's activations) is kept for the whole run. Accuracy: the error of
    sigma^2 shrinks like (sigma_2 / sigma_1)^(4k) after k rounds, so a small gap between the two
    largest singular values needs many rounds, and a stop at `tol` only says the estimate stopped
    moving. Computed in `f`'s dtype: use float32 or float64 models (bf16 gives ~1e-2 at best).
    Scaled-dot-product attention runs on its math kernel here (the fused kernels have no
    forward-mode derivative). Raises ValueError for iters < 1 or a 0-dimensional `s`.
    """
    if iters < 1:
        raise ValueError(f"iters={iters}: must be at least 1")
    if s.dim() < 1:
        raise ValueError("s must have a batch dimension")
    s = s.detach()
    with sdpa_kernel([SDPBackend.MATH]), torch.enable_grad():
        _, vjp_fn = torch.func.vjp(f, s)
        v = _start_vector(s, generator)
        estimate = None
        for _ in range(iters):
            _, jv = torch.func.jvp(f, (s,), (v,))
            new = _row_norm(jv.detach())
            w = vjp_fn(jv)[0].detach()
            v = w / _per_row(_row_norm(w).clamp_min(torch.finfo(w.dtype).tiny), w)
            done = estimate is not None and bool(((new - estimate).abs() <= tol * new).all())
            estimate = new
            if done:
                break
    return estimate


# ----------------------------------------------------------------------------------------------
# The only functions that know the loop runner's API.


def _tracing_twin(model):
    """`model` if it already traces without eval noise, else a copy with the trace on, eval
    noise off and the same weights (as `blockloop.analysis.tracing_copy`, which this module may
    not import)."""
    cfg = model.config
    if cfg.loops_representation and not cfg.loop_noise_in_eval:
        return model
    like = next(model.parameters())
    twin = type(model)(replace(cfg, loops_representation=True, loop_noise_in_eval=False))
    twin.to(device=like.device, dtype=like.dtype).load_state_dict(model.state_dict())
    return twin


def _check_unit(model, unit_index: int) -> None:
    if model.looper is None:
        raise ValueError("the model has no looped blocks (loop_center_idx < 0)")
    units = len(model.loop_plan.units)
    if isinstance(unit_index, bool) or not isinstance(unit_index, int) or not (
        0 <= unit_index < units
    ):
        raise ValueError(f"unit_index={unit_index!r}: the model has looped units 0 .. {units - 1}")


def unit_inputs(model, idx: torch.Tensor, unit_index: int, num_loops: int):
    """(x0, states) of looped unit `unit_index` for token ids `idx` (B, L).

    One forward pass in eval mode with `num_loops` iterations per unit, no automatic exit and
    no loop noise; `states` is the trace (num_loops + 1, B, L, C) with states[t] = s_t, and
    x0 (B, L, C) is the unit's input (equal to states[0] with "input" state init and no noise). Units are in execution order (untied looping:
    one per block of the looped range; unit k's input is unit k-1's output after `num_loops`
    iterations). Raises ValueError for a plain model, a unit index out of range or a count the
    model cannot run.
    """
    _check_unit(model, unit_index)
    twin = _tracing_twin(model)
    with eval_mode(twin), torch.no_grad():
        twin(idx, num_loops=num_loops, loop_exit=False)
    unit = twin.last_loop_trace.units[unit_index]
    return unit.x0, unit.states


def iteration_map(model, unit_index: int, x0: torch.Tensor, t: int):
    """The map s_(t-1) -> s_t of looped unit `unit_index` with input x0 (B, L, C), as a callable
    on (B, L, C) states, through the loop runner's own step (injection, adapter and blocks as
    the model defines them; no noise, which only enters s_0). At t = 1 there is no injection.
    The model's train/eval mode is the caller's to set (eval for analysis: dropout off).
    """
    _check_unit(model, unit_index)
    if t < 1:
        raise ValueError(f"t={t}: iterations count from 1")
    looper, unit = model.looper, model.loop_plan.units[unit_index]
    unit_blocks = [model.transformer.h[i] for i in unit]

    def step(state):
        return looper._step(state, x0, t, unit_index, unit, unit_blocks, None)

    return step


# ----------------------------------------------------------------------------------------------


def jacobian_sigma_max(
    model, idx, group: int = 0, iteration: int | None = None, iters: int = 100,
    tol: float = 1e-6, num_loops: int | None = None, generator=None,
) -> torch.Tensor:
    """Local Lipschitz constant of looped unit `group`'s iteration map, per sequence: (B,).

    The largest singular value of the Jacobian of s -> R(inject(s, x0)) (the map s_(t-1) -> s_t,
    acting on a sequence's whole L x C state) at the state s_(t-1) entering iteration
    t = `iteration` (default: the last, t = num_loops), for each sequence of `idx` (B, L).
    `num_loops` (default: the trained `max_loops`) is the iteration count of the traced forward
    that produces x0 and s_(t-1); `group` is the looped unit in execution order (untied: one per
    block). Eval mode, no noise, no automatic exit; estimated by `sigma_max` (power iteration,
    `iters` rounds at most, stopping at relative change `tol`). Float32, on the model's device.
    Raises ValueError for a plain model, a unit out of range or t outside 1 .. num_loops.
    """
    num_loops = model.config.max_loops if num_loops is None else num_loops
    t = num_loops if iteration is None else iteration
    if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= num_loops:
        raise ValueError(f"iteration={iteration!r}: must be in 1 .. num_loops={num_loops}")
    x0, states = unit_inputs(model, idx, group, num_loops)
    with eval_mode(model):
        f = iteration_map(model, group, x0, t)
        return sigma_max(f, states[t - 1], iters=iters, tol=tol, generator=generator).float()


# ----------------------------------------------------------------------------------------------
# Per-iteration statistics of traced states and of their logit lens.


def _as64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().to(torch.float64)


def step_statistics(states) -> dict[str, torch.Tensor]:
    """Per iteration and token: states (T+1, *tokens, C) -> dict of float64 (T+1, *tokens).

    - "step_norm": ||s_t - s_(t-1)|| (L2 over channels); NaN at t = 0;
    - "delta": the relative change ||s_t - s_(t-1)|| / (||s_(t-1)|| + 1e-6), the per-token form
      of the quantity automatic exit thresholds (`blockloop.looping.relative_change`, which
      averages it over a sequence's tokens); NaN at t = 0;
    - "cos": cos(s_t - s_(t-1), s_(t-1) - s_(t-2)), the angle between successive steps (-1: the
      state reverses, as in a 2-cycle; +1: it keeps going the same way); NaN at t = 0 and 1 and
      where either step is zero;
    - "state_norm": ||s_t||.
    Raises ValueError unless `states` has an iteration and a channel dimension.
    """
    x = _as64(states)
    if x.dim() < 2:
        raise ValueError(f"states has shape {tuple(x.shape)}; expected (T+1, ..., C)")
    nan = torch.full((1, *x.shape[1:-1]), float("nan"), dtype=torch.float64, device=x.device)
    steps = x[1:] - x[:-1]
    step_norm = steps.norm(dim=-1)
    delta = step_norm / (x[:-1].norm(dim=-1) + NORM_EPS)
    dot = (steps[1:] * steps[:-1]).sum(dim=-1)
    denom = step_norm[1:] * step_norm[:-1]
    cos = torch.where(denom > 0, dot / denom.clamp_min(TINY64), float("nan"))
    return {
        "step_norm": torch.cat([nan, step_norm]),
        "delta": torch.cat([nan, delta]),
        "cos": torch.cat([nan, nan, cos])[: x.shape[0]],
        "state_norm": x.norm(dim=-1),
    }


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the last dimension where `mask`; NaN where nothing counts: (B, L) -> (B,)."""
    counted = mask.sum(dim=-1)
    total = torch.where(mask, values, 0.0).sum(dim=-1)
    return torch.where(counted > 0, total / counted.clamp_min(1), float("nan"))


def lens_statistics(
    logits_per_iteration, targets, ignore_index: int = -1
) -> dict[str, torch.Tensor]:
    """Logit-lens statistics per iteration and sequence, in nats (natural logarithms).

    logits_per_iteration (T+1, B, L, V): the lens logits of every iterate s_0 .. s_T (however the
    caller reads them out, e.g. ln_f + lm_head); targets (B, L) int64, positions equal to
    `ignore_index` left out of every mean. Returns float64 tensors (T+1, B), each a mean over a
    sequence's counted positions:
    - "loss": cross-entropy -log p_t(target);
    - "entropy": H(p_t) = -sum_v p_t(v) log p_t(v);
    - "kl_prev": KL(p_t || p_(t-1)) = sum_v p_t(v) (log p_t(v) - log p_(t-1)(v)), how much the
      lens distribution moved in iteration t; NaN at t = 0.
    A sequence with no counted position gets NaN. Raises ValueError on mismatched shapes.
    """
    logits, targets = torch.as_tensor(logits_per_iteration), torch.as_tensor(targets)
    if logits.dim() != 4 or tuple(logits.shape[1:3]) != tuple(targets.shape):
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)}: expected "
            "(T+1, B, L, V) and (B, L)"
        )
    mask = targets != ignore_index
    safe = torch.where(mask, targets, 0).long()
    out = {k: [] for k in ("loss", "entropy", "kl_prev")}
    previous = None
    for step_logits in logits:
        logp = F.log_softmax(step_logits.detach().to(torch.float64), dim=-1)
        p = logp.exp()
        out["loss"].append(_masked_mean(-logp.gather(-1, safe[..., None])[..., 0], mask))
        # 0 log 0 = 0 (a logit of -inf, e.g. a masked padding id, has p = 0).
        plogp = torch.where(p > 0, p * logp, 0.0)
        out["entropy"].append(_masked_mean(-plogp.sum(dim=-1), mask))
        if previous is None:
            nan = torch.full(mask.shape[:1], float("nan"), dtype=torch.float64, device=p.device)
            out["kl_prev"].append(nan)
        else:
            kl = torch.where(p > 0, p * (logp - previous), 0.0).sum(dim=-1)
            out["kl_prev"].append(_masked_mean(kl, mask))
        previous = logp
    return {k: torch.stack(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# The fate of long trajectories.


def _diverging(x, norms, diverge_norm, window, growth) -> torch.Tensor:
    """Non-finite anywhere, final norm past `diverge_norm`, or, over the last `window` steps,
    norms rising monotonically while each step is at least `growth` times the one before
    (geometric growth: s_t = lam s_(t-1) has steps growing by lam; a drift by a constant
    update has steps of constant size and is not counted)."""
    nonfinite = ~torch.isfinite(x).all(dim=-1).all(dim=0)
    past = norms[-1] > diverge_norm
    steps = (x[1:] - x[:-1]).norm(dim=-1)
    k = min(window, steps.shape[0] - 1)
    if k < 2:
        return nonfinite | past
    recent, recent_norms = steps[-(k + 1):], norms[-(k + 1):]
    rising = (recent_norms[1:] > recent_norms[:-1]).all(dim=0)
    geometric = (recent[1:] >= growth * recent[:-1]).all(dim=0) & (recent[:-1] > 0).all(dim=0)
    return nonfinite | past | (rising & geometric)


def _smallest_period(x, scale, tol, max_period) -> torch.Tensor:
    """Per token, the smallest p in 2 .. max_period with ||s_(T-j) - s_(T-j-p)|| <= tol * scale
    for j = 0 .. p-1 (the last p states repeat); 0 where none does. Periods need T >= 2p - 1."""
    T = x.shape[0] - 1
    period = torch.zeros(x.shape[1], dtype=torch.long, device=x.device)
    for p in range(max_period, 1, -1):
        if 2 * p - 1 > T:
            continue
        gaps = (x[T - p + 1:] - x[T - 2 * p + 1: T - p + 1]).norm(dim=-1)
        period = torch.where((gaps <= tol * scale).all(dim=0), p, period)
    return period


def trajectory_fate(
    states, tol: float = 1e-4, max_period: int = 8, diverge_norm: float = 1e6,
    window: int = 8, growth: float = 1.01,
) -> dict:
    """Classify each token's trajectory s_0 .. s_T: states (T+1, N, C), float (any real dtype).

    Typically T is several times the trained count (e.g. 4x), from `unit_inputs`. In order:
    - "diverging": non-finite anywhere, final norm above `diverge_norm`, or geometric growth
      over the last `window` steps (norms rising and each step >= `growth` x the previous);
    - "fixed_point": the last two steps each move less than `tol` relative to the trajectory's
      scale (its largest state norm; relative to that rather than to ||s_(t-1)|| so that a
      contraction towards 0, s -> 0.5 s, counts as converging);
    - "cycle": the last p states repeat the p before them to `tol` (relative to the scale) for
      the smallest p in 2 .. `max_period` (needs T >= 2p - 1; longer periods are not seen);
    - "wandering": none of these (slow convergence, drift, or chaos: undecided at this T).
    Returns {"labels": str ndarray (N,), "periods": int64 ndarray (N,) (p for cycles, else 0),
    "fractions": {fate: fraction of the N tokens} over FATES, "settings": the thresholds}.
    Compare Strogatz, "Nonlinear Dynamics and Chaos", ch. 10 (fixed points and cycles of maps).
    Raises ValueError unless states is (T+1, N, C) with T >= 2, or for max_period < 2.
    """
    x = _as64(states)
    if x.dim() != 3 or x.shape[0] < 3:
        raise ValueError(f"states has shape {tuple(x.shape)}; expected (T+1, N, C) with T >= 2")
    if max_period < 2:
        raise ValueError(f"max_period={max_period}: must be at least 2")
    norms = x.norm(dim=-1)
    diverging = _diverging(x, norms, diverge_norm, window, growth)
    x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    scale = torch.nan_to_num(norms, nan=0.0, posinf=0.0).amax(dim=0) + NORM_EPS
    last_steps = (x[-2:] - x[-3:-1]).norm(dim=-1)
    fixed = (last_steps < tol * scale).all(dim=0) & ~diverging
    period = _smallest_period(x, scale, tol, max_period)
    cycle = (period > 0) & ~fixed & ~diverging
    labels = np.full(x.shape[1], "wandering", dtype=object)
    for name, chosen in (("cycle", cycle), ("fixed_point", fixed), ("diverging", diverging)):
        labels[chosen.cpu().numpy()] = name
    labels = labels.astype(str)
    n = max(len(labels), 1)
    return {
        "labels": labels,
        "periods": torch.where(cycle, period, 0).cpu().numpy().astype(np.int64),
        "fractions": {fate: float((labels == fate).sum()) / n for fate in FATES},
        "settings": {"tol": tol, "max_period": max_period, "diverge_norm": diverge_norm,
                     "window": window, "growth": growth},
    }


# ----------------------------------------------------------------------------------------------
# Geometry of trajectories: PCA projection, box-counting dimension, CKA.


def project_pca(points, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Project points (N, C) on their first k principal components (Pearson 1901; computed by an
    SVD of the centred data in float64). Returns (coordinates (N, k), explained variance ratio
    of each of the k components (k,)); flatten trajectories (T+1, n, C) to (N, C) first so all
    iterations share one projection. Raises ValueError unless points is (N, C) with k <= C."""
    x = _as64(points)
    if x.dim() != 2 or not 1 <= k <= x.shape[1]:
        raise ValueError(f"points {tuple(x.shape)}, k={k}: expected (N, C) with 1 <= k <= C")
    x = x - x.mean(dim=0)
    _, sv, vh = torch.linalg.svd(x, full_matrices=False)
    variance = sv**2
    ratio = variance[:k] / variance.sum() if variance.sum() > 0 else torch.zeros(k, dtype=x.dtype)
    return x @ vh[:k].T, ratio


def _box_counts(unit_points: np.ndarray, sizes) -> np.ndarray:
    """Occupied boxes of each size for points in [0, 1]^d (grid anchored at the origin)."""
    counts = []
    for eps in sizes:
        cells = np.floor(unit_points / eps).astype(np.int64)
        cells = np.minimum(cells, max(math.ceil(1 / eps) - 1, 0))
        counts.append(len(np.unique(cells, axis=0)))
    return np.asarray(counts, dtype=np.float64)


def _default_sizes(unit_points: np.ndarray, points_per_box: float) -> np.ndarray:
    """2^-k for k = 2, 3, ...: skip the coarsest grids (dominated by the set's bounding box)
    and stop before saturation, while on average at least `points_per_box` points share an
    occupied box (finer boxes would count the sample, not the set)."""
    n, sizes = len(unit_points), []
    for k in range(2, 40):
        if _box_counts(unit_points, [2.0**-k])[0] > n / points_per_box:
            break
        sizes.append(2.0**-k)
    return np.asarray(sizes)


def box_counting_dimension(points_2d, scales=None, points_per_box: float = 10.0) -> dict:
    """Box-counting (Minkowski-Bouligand) dimension of a point set, e.g. trajectories projected
    to 2-D by `project_pca` (Falconer, "Fractal Geometry", ch. 3).

    points_2d (N, d) (d = 2 usually), finite. N(eps) is the number of grid boxes of side eps
    that hold a point; the dimension is the least-squares slope of log N(eps) against
    log(1/eps) over the fit range. `scales`: box sides in the points' units, all used in the
    fit; default: the set's extent (largest coordinate range) times 2^-k for k = 2, 3, ... down
    to the finest size at which occupied boxes still hold `points_per_box` points on average.
    Returns {"dimension": float, "fit_range": (smallest, largest box side) in the points' units,
    "log_eps": natural logs of the box sides, "log_counts": log N(eps)}; a set of one point has
    dimension 0 and fit_range None. Raises ValueError for non-finite points, fewer than 3
    scales, or a non-positive scale. The estimate is biased at few points: use thousands.
    """
    x = _as64(points_2d).cpu().numpy()
    if x.ndim != 2 or len(x) == 0 or not np.isfinite(x).all():
        raise ValueError(f"points {x.shape}: expected finite (N, d) with N >= 1")
    low, extent = x.min(axis=0), float((x.max(axis=0) - x.min(axis=0)).max())
    if extent == 0:
        empty = np.array([])
        return {"dimension": 0.0, "fit_range": None, "log_eps": empty, "log_counts": empty}
    unit = (x - low) / extent
    if scales is None:
        sizes = _default_sizes(unit, points_per_box)
    else:
        sizes = np.asarray(scales, dtype=np.float64) / extent
        if (sizes <= 0).any():
            raise ValueError(f"scales {scales}: box sides must be positive")
    if len(sizes) < 3:
        raise ValueError(f"{len(sizes)} box sizes in the fit range; need 3 (more points?)")
    log_eps = np.log(sizes * extent)
    log_counts = np.log(_box_counts(unit, sizes))
    slope = np.polyfit(-log_eps, log_counts, 1)[0]
    return {
        "dimension": float(slope),
        "fit_range": (float(sizes.min() * extent), float(sizes.max() * extent)),
        "log_eps": log_eps,
        "log_counts": log_counts,
    }


def _centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=0)


def cka_across(states_a, states_b) -> torch.Tensor:
    """Linear CKA (Kornblith et al. 2019) between every representation of set a and of set b.

    states_a (Ta, n, Ca), states_b (Tb, n, Cb): two sets of representations of the same n tokens
    (rows; e.g. the loop iterates s_0 .. s_T and a plain model's layer outputs). Columns are
    centred over tokens and CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), in float64;
    it is 1 for X = Y and invariant to orthogonal transforms and isotropic scaling of either.
    Returns (Ta, Tb) float64; NaN where a representation is constant over tokens. Raises
    ValueError unless both are 3-D with the same n.
    """
    a, b = _as64(states_a), _as64(states_b)
    if a.dim() != 3 or b.dim() != 3 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"states {tuple(a.shape)} and {tuple(b.shape)}: expected (Ta, n, Ca), (Tb, n, Cb)"
        )
    a = torch.stack([_centred(x) for x in a])
    b = torch.stack([_centred(y).to(a.device) for y in b])
    self_a = torch.stack([torch.linalg.matrix_norm(x.T @ x) for x in a])
    self_b = torch.stack([torch.linalg.matrix_norm(y.T @ y) for y in b])
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i, j] = torch.linalg.matrix_norm(y.T @ x) ** 2
    denom = self_a[:, None] * self_b[None, :]
    return torch.where(denom > 0, out / denom.clamp_min(TINY64), float("nan"))


# ----------------------------------------------------------------------------------------------
# Bootstrap intervals over sequences (`blockloop.stats.bootstrap_interval`, column by column).


def _interval_of(column: np.ndarray, confidence, n_resamples, seed, method) -> tuple:
    """(mean, low, high, n) of one column of per-sequence values; NaN entries are left out.
    An infinite value (a diverged sequence) makes the mean infinite and the interval NaN."""
    x = column[~np.isnan(column)]
    if x.size == 0:
        return math.nan, math.nan, math.nan, 0
    if not np.isfinite(x).all():
        return float(np.mean(x)), math.nan, math.nan, int(x.size)
    r = bootstrap_interval(x, confidence=confidence, n_resamples=n_resamples, seed=seed,
                           method=method)
    low = math.nan if r["low"] is None else r["low"]
    high = math.nan if r["high"] is None else r["high"]
    return r["estimate"], low, high, int(x.size)


def bootstrap_ci(
    values, axis: int = 0, confidence: float = 0.95, n_resamples: int = 1000, seed: int = 0,
    method: str = "BCa",
) -> dict:
    """Mean over `axis` (the sequences) with a bootstrap confidence interval, computed for each
    entry of the other axes by `blockloop.stats.bootstrap_interval` (scipy.stats.bootstrap:
    `n_resamples` resamples of the sequences with replacement from numpy's default_rng(`seed`),
    deterministic; `method` "BCa" (Efron 1987; percentile where BCa is undefined, e.g. a
    constant column) or "percentile" (Efron & Tibshirani, "An Introduction to the Bootstrap",
    1993, ch. 13)). NaNs are left out (a sequence that lacks a value, e.g. t = 0 of a step
    statistic, does not poison the rest); an all-NaN entry gives NaN, one value gives NaN bounds,
    and an infinite value (a diverged sequence) gives an infinite mean with NaN bounds.
    Returns {"mean", "low", "high"}: float64 ndarrays of `values`' shape without `axis`, and "n"
    (int64, the values counted per entry). Raises ValueError for confidence outside (0, 1),
    n_resamples < 1 or no values.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: must be in (0, 1)")
    if n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples}: must be at least 1")
    values = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values
    x = np.moveaxis(np.asarray(values, dtype=np.float64), axis, 0)
    if x.shape[0] < 1:
        raise ValueError("no values to bootstrap")
    flat = x.reshape(x.shape[0], -1)
    out = np.array([_interval_of(col, confidence, n_resamples, seed, method) for col in flat.T])
    out = out.reshape(-1, 4)
    shape = x.shape[1:]
    return {
        "mean": out[:, 0].reshape(shape), "low": out[:, 1].reshape(shape),
        "high": out[:, 2].reshape(shape), "n": out[:, 3].astype(np.int64).reshape(shape),
    }


# ----------------------------------------------------------------------------------------------
# Everything above for a model on validation batches, per looped unit and iteration.

LENS_VARIANTS = ("continue", "direct")
STEP_KEYS = ("step_norm", "delta", "cos", "state_norm")
LENS_KEYS = ("lens_loss", "lens_entropy", "lens_kl_prev")
DEFAULT_LIPSCHITZ_SEQUENCES = 8
DEFAULT_LIPSCHITZ_ITERS = 20
DEFAULT_FATE_FACTOR = 4
DEFAULT_FATE_TOKENS = 1024
DEFAULT_RESAMPLES = 2000
# Power iteration stops early once every sequence's estimate moved by at most this (relative).
LIPSCHITZ_TOL = 1e-4
# Lens logits are computed for this many (iteration, sequence, position, vocabulary) entries
# at a time, so a large vocabulary does not hold (T+1) x B x L x V floats at once.
LENS_CHUNK_ELEMENTS = 2**24


def _traced_units(model, x: torch.Tensor, num_loops):
    """The loop trace's units after one forward pass of token ids x (B, L), no automatic exit.
    The model must trace (`_tracing_twin`) and be in the mode the caller wants."""
    model(x, num_loops=num_loops, loop_exit=False)
    return model.last_loop_trace.units


def _lens_logits(model, unit_index: int, s: torch.Tensor, num_loops, lens: str):
    """Logits (B, L, V) of state s of looped unit `unit_index` through the logit lens: "direct"
    is ln_f + lm_head on s; "continue" runs the rest of the stack first (later units at
    `num_loops`, the blocks after them), so the last unit's last iterate gives the model's own
    logits whatever follows the loop."""
    if lens == "continue":
        s = model.continue_after_unit(s, unit_index, num_loops)
    return model.logit_lens(s)


def _sequence_lens(model, unit_index: int, states, targets, num_loops, lens: str) -> dict:
    """`lens_statistics` of every iterate states (T+1, B, L, C), chunked over sequences:
    {"lens_loss", "lens_entropy", "lens_kl_prev"} float64 (T+1, B)."""
    T1, B, L, _ = states.shape
    chunk = max(1, LENS_CHUNK_ELEMENTS // (T1 * L * model.config.vocab_size))
    parts = []
    for b in range(0, B, chunk):
        rows = slice(b, b + chunk)
        logits = torch.stack(
            [_lens_logits(model, unit_index, s[rows], num_loops, lens).float() for s in states]
        )
        parts.append(lens_statistics(logits, targets[rows]))
    return {f"lens_{k}": torch.cat([p[k] for p in parts], dim=1).cpu() for k in parts[0]}


def _per_sequence(model, x, y, num_loops, lens: str) -> tuple[list, list[dict]]:
    """One traced pass on batch (x, y): per looped unit, (x0, states) and the per-sequence
    means over tokens of the step statistics and lens statistics, float64 (T+1, B) each."""
    units = _traced_units(model, x, num_loops)
    rows = []
    for k, unit in enumerate(units):
        steps = step_statistics(unit.states)
        row = {key: torch.nanmean(v, dim=-1).cpu() for key, v in steps.items()}
        row.update(_sequence_lens(model, k, unit.states, y, num_loops, lens))
        rows.append(row)
    return [(u.x0, u.states) for u in units], rows


def _collect(model, batches, num_loops, lens, keep: int, device, ctx) -> tuple[list, list]:
    """Per looped unit: the statistics of every sequence of `batches` (key -> (T+1, N)) and the
    (x0, states) of the first `keep` sequences, for the Lipschitz estimate."""
    stats, kept = None, None
    with ctx, torch.no_grad():
        for x, y in batches:
            traced, rows = _per_sequence(model, x.to(device), y.to(device), num_loops, lens)
            if stats is None:
                stats = [{k: [] for k in row} for row in rows]
                kept = [([], []) for _ in traced]
            for acc, row in zip(stats, rows):
                for key, value in row.items():
                    acc[key].append(value)
            for (xs, ss), (x0, states) in zip(kept, traced):
                if sum(len(a) for a in xs) < keep:
                    xs.append(x0)
                    ss.append(states)
    stats = [{k: torch.cat(v, dim=1) for k, v in acc.items()} for acc in stats]
    kept = [(torch.cat(xs)[:keep], torch.cat(ss, dim=1)[:, :keep]) for xs, ss in kept]
    return stats, kept


def _lipschitz(model, unit_index: int, x0, states, iters: int, tol: float) -> torch.Tensor:
    """sigma_max of the iteration map of unit `unit_index` at s_(t-1), t = 1 .. T, for each
    kept sequence: float64 (T+1, n), NaN at t = 0. In the model's dtype, without autocast.

    The map s_(t-1) -> s_t is one function of s for every t >= 2 (the loop's definition:
    u_t = inject(s_(t-1), x0); t only matters at t = 1, which skips injection with "input"
    init), and it treats sequences independently, so iterations 2 .. T run as one batch of
    (T-1) n rows: one power iteration for all of them."""
    dtype = next(model.parameters()).dtype
    x0, states = x0.to(dtype), states.to(dtype)
    n, T = x0.shape[0], states.shape[0] - 1
    gen = torch.Generator().manual_seed(0)
    first = sigma_max(iteration_map(model, unit_index, x0, 1), states[0], iters=iters, tol=tol,
                      generator=gen)
    rows = [torch.full((n,), math.nan, dtype=torch.float64), first.double().cpu()]
    if T >= 2:
        f = iteration_map(model, unit_index, x0.repeat(T - 1, 1, 1), 2)
        later = sigma_max(f, states[1:T].flatten(0, 1), iters=iters, tol=tol, generator=gen)
        rows += list(later.double().cpu().view(T - 1, n))
    return torch.stack(rows)


def _trajectory_dimension(states: torch.Tensor) -> dict:
    """Box-counting dimension of trajectories (T+1, N, C) projected on their first two principal
    components (all iterates of all tokens share one projection; non-finite states left out).
    {"dimension", "fit_range", "log_eps", "log_counts", "explained_variance", "points"}, with
    dimension None and a "reason" where it cannot be estimated (too few points or scales)."""
    points = states.reshape(-1, states.shape[-1]).to(torch.float64)
    points = points[torch.isfinite(points).all(dim=1)]
    base = {"dimension": None, "fit_range": None, "points": int(points.shape[0])}
    if points.shape[0] < 2 or points.shape[1] < 2:
        return {**base, "reason": "fewer than 2 finite states"}
    coords, ratio = project_pca(points, 2)
    try:
        box = box_counting_dimension(coords)
    except ValueError as e:
        return {**base, "reason": str(e)}
    return {**base, **box, "explained_variance": ratio.tolist(),
            "log_eps": box["log_eps"].tolist(), "log_counts": box["log_counts"].tolist()}


def _fate_summary(states: torch.Tensor, count: int) -> dict:
    """Fates (`trajectory_fate`) and box-counting dimension of one unit's long trajectories
    (T+1, B, L, C) run for `count` iterations."""
    flat = states.reshape(states.shape[0], -1, states.shape[-1])
    if count < 2:
        return {"num_loops": count, "skipped": "fates need at least 2 iterations"}
    fate = trajectory_fate(flat)
    periods = fate["periods"][fate["periods"] > 0]
    hist = {str(int(p)): int((periods == p).sum()) for p in np.unique(periods)}
    return {"num_loops": count, "tokens": int(flat.shape[1]), "fractions": fate["fractions"],
            "cycle_periods": hist, "settings": fate["settings"],
            "box_counting": _trajectory_dimension(flat)}


def _fates(model, batches, factor: int, tokens: int, device, ctx) -> list[dict]:
    """Per looped unit, the fates of up to `tokens` tokens (whole sequences from the first
    batches) after `factor` x each group's trained count of iterations."""
    counts = [g.count * factor for g in model.loop_plan.groups]
    length = batches[0][0].shape[1]
    x = torch.cat([b[0] for b in batches])[: max(1, math.ceil(tokens / length))].to(device)
    groups = model.loop_plan.unit_groups
    try:
        with ctx, torch.no_grad():
            units = _traced_units(model, x, counts if len(counts) > 1 else counts[0])
    except ValueError as e:  # a count the model cannot run (concat built for one iteration)
        return [{"num_loops": counts[g], "skipped": str(e)} for g in groups]
    return [_fate_summary(u.states, counts[g]) for u, g in zip(units, groups)]


def _rows(values: dict, confidence: float, n_resamples: int, seed: int) -> list[dict]:
    """Per-iteration rows {"t", key: {"mean", "low", "high", "n"}} from per-sequence values
    key -> (T+1, N); NaN where undefined (e.g. t = 0 of a step statistic)."""
    cis = {k: bootstrap_ci(v, axis=1, confidence=confidence, n_resamples=n_resamples, seed=seed)
           for k, v in values.items()}
    length = next(iter(values.values())).shape[0]
    return [
        {"t": t, **{k: {"mean": float(ci["mean"][t]), "low": float(ci["low"][t]),
                        "high": float(ci["high"][t]), "n": int(ci["n"][t])}
                    for k, ci in cis.items()}}
        for t in range(length)
    ]


def _check_dynamics_args(model, batches, fate_factor, lipschitz_sequences, lipschitz_iters,
                         lens) -> None:
    if model.looper is None:
        raise ValueError("the model has no looped blocks (loop_center_idx < 0)")
    if not batches:
        raise ValueError("no batches to analyse")
    for name, value in (("fate_factor", fate_factor), ("lipschitz_sequences", lipschitz_sequences),
                        ("lipschitz_iters", lipschitz_iters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an integer >= 1")
    if lens not in LENS_VARIANTS:
        raise ValueError(f"lens={lens!r}: must be one of {', '.join(LENS_VARIANTS)}")


def loop_dynamics(
    model, batches, num_loops=None, fate_factor: int = DEFAULT_FATE_FACTOR,
    lipschitz_sequences: int = DEFAULT_LIPSCHITZ_SEQUENCES,
    lipschitz_iters: int = DEFAULT_LIPSCHITZ_ITERS, device="cpu", ctx=None, *,
    lens: str = "continue", fate_tokens: int = DEFAULT_FATE_TOKENS, confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
) -> dict:
    """The loop's dynamics per looped unit and iteration, over the sequences of `batches`.

    batches: list of (x, y), int64 (B, L), y = -1 unscored. One traced pass per batch (eval
    mode, `num_loops` iterations: None = the trained counts, an int for every group or a list
    per group; no automatic exit, no loop noise; under autocast `ctx`, None = float32). For
    every unit, per iteration t = 0 .. T, the mean over sequences (each sequence first averaged
    over its tokens) with a `confidence` bootstrap interval over sequences (`bootstrap_ci`,
    BCa, `n_resamples` resamples, seeded `seed`) of:
    - "step_norm" ||s_t - s_(t-1)||, "state_norm" ||s_t|| (L2 over channels, the residual
      stream's units), "delta" the relative change, "cos" the cosine between successive steps
      (`step_statistics`; dimensionless);
    - "lens_loss", "lens_entropy", "lens_kl_prev" KL(p_t || p_(t-1)) (nats; `lens_statistics`)
      through the logit lens `lens`: "continue" (the rest of the stack, then ln_f + lm_head) or
      "direct" (ln_f + lm_head on s_t);
    - "lipschitz": sigma_max of the Jacobian of s -> R(inject(s, x0)) at s_(t-1) (t >= 1), on
      the first `lipschitz_sequences` sequences, by `sigma_max` (power iteration, at most
      `lipschitz_iters` rounds, float32, no autocast); > 1 expands, < 1 contracts locally.
    and the fates (`trajectory_fate`) of up to `fate_tokens` tokens after `fate_factor` x each
    group's trained count, with the box-counting dimension of those trajectories in their 2-D
    PCA projection (`box_counting_dimension`, fit range in the projection's units).
    Returns {"units": [{"unit", "group", "blocks", "num_loops", "rows": [{"t", key: {"mean",
    "low", "high", "n"}}], "fate": {...}}], "sequences", "confidence", "bootstrap", "lens",
    "lipschitz": the estimator's settings, "fate_factor"}; NaN where undefined. Raises ValueError
    for a plain model, no batches, a bad option or a count the model cannot run.
    """
    _check_dynamics_args(model, batches, fate_factor, lipschitz_sequences, lipschitz_iters, lens)
    twin = _tracing_twin(model)
    ctx = nullcontext() if ctx is None else ctx
    with eval_mode(twin):
        stats, kept = _collect(twin, batches, num_loops, lens, lipschitz_sequences, device, ctx)
        for k, (values, (x0, states)) in enumerate(zip(stats, kept)):
            values["lipschitz"] = _lipschitz(twin, k, x0, states, lipschitz_iters, LIPSCHITZ_TOL)
        fates = _fates(twin, batches, fate_factor, fate_tokens, device, ctx)
    units = [
        {"unit": k, "group": g, "blocks": list(blocks), "num_loops": values["delta"].shape[0] - 1,
         "rows": _rows(values, confidence, n_resamples, seed), "fate": fate}
        for k, ((g, blocks), values, fate) in enumerate(zip(twin.loop_plan.unit_list, stats, fates))
    ]
    return {
        "units": units,
        "sequences": int(stats[0]["delta"].shape[1]),
        "confidence": confidence,
        "bootstrap": {"method": "BCa (blockloop.stats.bootstrap_interval)",
                      "n_resamples": n_resamples, "seed": seed, "over": "sequences"},
        "lens": lens,
        "lipschitz": {"estimator": "power iteration on J^T J (jvp + vjp), matrix-free",
                      "sequences": int(kept[0][0].shape[0]), "max_power_iterations": lipschitz_iters,
                      "tol": LIPSCHITZ_TOL, "at": "s_(t-1), the state entering iteration t"},
        "fate_factor": fate_factor,
    }
