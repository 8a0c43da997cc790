"""The looping mechanism: which blocks loop, how they iterate, and what is recorded.

Everything that makes a looped transformer different from a plain one lives here, written to
read like its definition. Let `R` be a looped unit: the whole range of blocks `c-r .. c+r`
(tied looping) or one block of it (untied: each block of the range iterates on its own, in index
order). Let `x0` be the input to `R`. Then

    s0 = x0 + sigma * eps            eps ~ N(0, I); training only (or `loop_noise_in_eval`)
    u1 = s0
    ut = s(t-1)                      injection "none"
         s(t-1) + x0                 injection "add"
         A([s(t-1) ; x0])            injection "concat", t >= 2
    st = R(ut)                       t = 1 .. T, the output is sT

`A` is affine in `[s(t-1); x0]`; it is parametrised residually as `A(z) = s(t-1) + W z + b` with
`W`, `b` starting at zero, so a fresh adapter passes `s(t-1)` through exactly, and weight decay
pulls it back towards pass-through rather than towards zero (which would erase the state).

Automatic exit: after computing st for t >= 2, `delta_t` is the mean over tokens of
`||st - s(t-1)|| / (||s(t-1)|| + 1e-6)` (L2 over channels), per sequence. A sequence stops at the
first t with `delta_t < threshold` and keeps `st` while the others go on; only the sequences still
iterating are computed, so a sequence's output does not depend on the rest of its batch. Exit is
on in eval mode and generation when `automatic_loop_exit` is set; in training only with
`automatic_loop_exit_in_training`.

Training options: `loop_sampling` draws the iteration count of a training step (`sample_num_loops`,
seeded by the step so all DDP ranks agree); `loop_backprop_depth = k > 0` runs all but the last k
iterations without building a graph; `loop_checkpointing` recomputes each iteration's activations
in the backward pass instead of storing them.

Trace layout (`GPT.last_loop_trace`, only with `loops_representation=True`): a `LoopTrace` whose
`units` list has one `UnitTrace` per looped unit, in execution order, each holding
  - `blocks`: the block indices the unit covers,
  - `states`: float tensor (T+1, B, L, C), detached; `states[t]` is s_t (s_0 = the noised input).
    A sequence that exited at iteration e keeps `states[t] = s_e` for t > e,
  - `deltas`: float tensor (T, B); `deltas[t-1]` is delta_t (also for t = 1, for analysis);
    NaN for iterations a sequence did not run,
  - `iterations`: int64 tensor (B,), iterations each sequence ran.
`GPT.last_loop_iterations` holds the per-unit `iterations` tensors even with tracing off.

Generation cache (`kv_caches`, see `blockloop.sampling`): iteration t of block i reads and writes
`kv_caches.get(i, t)`; once some sequences have exited, the remaining iterations run on the active
rows through `kv_caches.rows(active)`, and the cache fills in the exited rows' later iterations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

INJECTION_MODES = ("none", "add", "concat")
LOOP_SAMPLING_MODES = ("fixed", "poisson_lognormal", "uniform")
# Spread of the log-normal rate in Poisson-lognormal sampling (the recurrent-depth recipe's 0.5).
POISSON_LOGNORMAL_SIGMA = 0.5
# Draws are capped so one heavy-tailed step cannot take minutes; the cap moves the mean by well
# under 1% at sigma 0.5.
SAMPLED_LOOPS_CAP_FACTOR = 4
# An upper bound on iteration counts so that a typo (max_loops=1e9) fails before any work, not
# hours into a forward pass; every command checks `--num_loops` against it too.
MAX_LOOPS_LIMIT = 4096
# Test-time loop scaling always includes these counts (and 1 .. twice the trained count).
SCALING_BASE_COUNTS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class LoopPlan:
    """The looped range `[start, stop)` and how it is split into looped units."""

    start: int
    stop: int
    tied: bool

    @classmethod
    def from_config(cls, config) -> "LoopPlan | None":
        if config.loop_center_idx < 0:
            return None
        return cls(
            start=config.loop_center_idx - config.loop_radius,
            stop=config.loop_center_idx + config.loop_radius + 1,
            tied=config.tied_looping,
        )

    @property
    def num_blocks(self) -> int:
        return self.stop - self.start

    @property
    def units(self) -> list[tuple[int, ...]]:
        blocks = tuple(range(self.start, self.stop))
        return [blocks] if self.tied else [(i,) for i in blocks]


# ----------------------------------------------------------------------------------------------
# What other modules ask about a configuration's loop. `config` is a GPTConfig (or anything with
# its looping keys); no other module restates these rules.


def is_looped(config) -> bool:
    """Whether the config has a looped range (`loop_center_idx >= 0`), whatever its count."""
    return config.loop_center_idx >= 0


def effective_depth(config, num_loops: int | None = None) -> int:
    """Blocks applied per forward pass when the looped range runs `num_loops` times (default:
    the trained `max_loops`); `n_layer` for a plain model."""
    plan = LoopPlan.from_config(config)
    if plan is None:
        return config.n_layer
    t = config.max_loops if num_loops is None else int(num_loops)
    return config.n_layer + plan.num_blocks * (t - 1)


def has_adapters(config) -> bool:
    """Whether the model owns concat adapters: "concat" injection built with `max_loops > 1`.

    Adapters act from the second iteration on, so a model built for one iteration has none and
    can then only run one iteration."""
    return is_looped(config) and config.injection_mode == "concat" and config.max_loops > 1


def max_runnable_loops(config) -> int:
    """The largest iteration count the model can run (1 for "concat" without adapters)."""
    if is_looped(config) and config.injection_mode == "concat" and not has_adapters(config):
        return 1
    return MAX_LOOPS_LIMIT


def check_num_loops(config, num_loops, key: str = "num_loops") -> None:
    """Raise ValueError naming `key` unless the model can run `num_loops` iterations."""
    if isinstance(num_loops, bool) or not isinstance(num_loops, int):
        raise ValueError(f"{key}={num_loops!r}: must be an integer")
    top = max_runnable_loops(config)
    if not 1 <= num_loops <= top:
        why = (
            "this model uses 'concat' injection and was built with max_loops=1, so it has no "
            "adapters and can only run 1 iteration"
            if top == 1 else f"iteration counts are limited to [1, {MAX_LOOPS_LIMIT}]"
        )
        raise ValueError(f"{key}={num_loops}: {why}")


def scaling_loop_counts(config, extra=()) -> list[int]:
    """Iteration counts for a test-time loop-scaling curve: 1 .. 2 * max_loops, the
    SCALING_BASE_COUNTS, and `extra`, limited to what the model can run ([] for a plain model)."""
    if not is_looped(config):
        return []
    counts = set(range(1, 2 * config.max_loops + 1)) | set(SCALING_BASE_COUNTS) | set(extra)
    return sorted(c for c in counts if 1 <= c <= max_runnable_loops(config))


def may_skip_gradients(config) -> bool:
    """Whether some training step may leave parameters without a gradient (DDP must then look
    for unused parameters): the concat adapters when a sampled count is 1 (they act from
    iteration 2), and every block before the loop under truncated backprop without injection
    (no path back to x0)."""
    if not is_looped(config):
        return False
    sampled_one = has_adapters(config) and config.loop_sampling != "fixed"
    truncated = config.loop_backprop_depth > 0 and config.injection_mode == "none"
    return sampled_one or truncated


@dataclass
class UnitTrace:
    blocks: tuple[int, ...]
    states: torch.Tensor
    deltas: torch.Tensor
    iterations: torch.Tensor


@dataclass
class LoopTrace:
    units: list[UnitTrace] = field(default_factory=list)


class ConcatAdapter(nn.Module):
    """A([s; x0]) = s + W [s; x0] + b, zero-initialised: exactly pass-through at the start."""

    def __init__(self, n_embd: int, bias: bool):
        super().__init__()
        self.proj = nn.Linear(2 * n_embd, n_embd, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def forward(self, state, x0):
        return state + self.proj(torch.cat([state, x0], dim=-1))


def relative_change(new, old):
    """delta per sequence: mean over tokens of ||new - old|| / (||old|| + 1e-6).

    Computed in float32 at least: in a bf16 model the rounding of the difference alone would
    exceed thresholds like 1e-3 and change exit decisions.
    """
    new, old = new.float(), old.float()
    return ((new - old).norm(dim=-1) / (old.norm(dim=-1) + 1e-6)).mean(dim=-1)


def sample_num_loops(config, generator: torch.Generator) -> int:
    """The iteration count for one training step, with mean `max_loops`.

    "poisson_lognormal": 1 + Poisson(exp(tau)), tau ~ N(log(max_loops - 1) - sigma^2/2, sigma).
    "uniform": uniform over 1 .. 2*max_loops - 1. "fixed": max_loops. Both random draws are
    capped at SAMPLED_LOOPS_CAP_FACTOR * max_loops.
    """
    mean = config.max_loops
    if config.loop_sampling == "fixed" or mean == 1:
        return mean
    cap = SAMPLED_LOOPS_CAP_FACTOR * mean
    if config.loop_sampling == "uniform":
        return int(torch.randint(1, 2 * mean, (1,), generator=generator).item())
    sigma = POISSON_LOGNORMAL_SIGMA
    tau = torch.normal(
        math.log(mean - 1) - sigma**2 / 2, sigma, (1,), generator=generator
    )
    draw = torch.poisson(tau.exp(), generator=generator)
    return int(min(1 + draw.item(), cap))


class LoopRunner(nn.Module):
    """Runs the looped range of a block stack; owns the concat adapters (one per looped unit)."""

    def __init__(self, config, plan: LoopPlan):
        super().__init__()
        self.plan = plan
        # The config's own names are used throughout (config.max_loops, ...), so a search for
        # an option finds every use; the config is read, never mutated, here.
        self.config = config
        if has_adapters(config):
            self.adapters = nn.ModuleList(
                ConcatAdapter(config.n_embd, config.bias) for _ in plan.units
            )
        else:
            self.adapters = None

    def nonfinite_onset(self) -> tuple[int, int] | None:
        """(looped unit index, iteration t >= 1) where the loop state first held NaN or infinity
        in the last forward pass outside training, or None if every state was finite (or the
        last pass was a training one)."""
        for u, finite in enumerate(getattr(self, "last_finite", None) or []):
            bad = (~finite).nonzero()
            if bad.numel():
                return u, int(bad[0]) + 1
        return None

    def reset_adapters(self) -> None:
        if self.adapters is not None:
            for adapter in self.adapters:
                adapter.reset_parameters()

    def adapter_params_per_unit(self) -> int:
        if self.adapters is None:
            return 0
        return sum(p.numel() for p in self.adapters[0].parameters())

    def forward(
        self,
        x,
        blocks: nn.ModuleList,
        num_loops: int | None = None,
        loop_exit: bool | None = None,
        exit_threshold: float | None = None,
        kv_caches=None,
    ):
        """Returns (output, iterations per unit, LoopTrace or None)."""
        cfg = self.config
        num_loops = cfg.max_loops if num_loops is None else int(num_loops)
        check_num_loops(cfg, num_loops)
        if loop_exit is None:
            loop_exit = cfg.automatic_loop_exit and (
                not self.training or cfg.automatic_loop_exit_in_training
            )
        threshold = None
        if loop_exit:
            threshold = cfg.automatic_loop_exit_threshold if exit_threshold is None else exit_threshold
        trace = LoopTrace() if cfg.loops_representation else None
        # Outside training, whether each iteration's state is finite is kept (no host sync) so
        # a diverged run can be reported with the iteration where it broke (`nonfinite_onset`).
        self.last_finite = None if self.training else []
        iterations = []
        for u, unit in enumerate(self.plan.units):
            unit_blocks = [blocks[i] for i in unit]
            adapter = self.adapters[u] if self.adapters is not None else None
            x, used, unit_trace = self._run_unit(
                x, unit, unit_blocks, adapter, num_loops, threshold, kv_caches
            )
            iterations.append(used)
            if trace is not None:
                trace.units.append(unit_trace)
        return x, iterations, trace

    def _inject(self, state, x0, adapter):
        if self.config.injection_mode == "none":
            return state
        if self.config.injection_mode == "add":
            return state + x0
        return adapter(state, x0)

    def _apply_unit(self, u, unit, unit_blocks, t, kv_caches):
        if kv_caches is None:
            for block in unit_blocks:
                u = block(u)
            return u
        for i, block in zip(unit, unit_blocks):
            u = block(u, kv_caches.get(i, t))
        return u

    def _step(self, state, x0, t, unit, unit_blocks, adapter, kv_caches):
        """One iteration: s_t = R(u_t)."""
        u = state if t == 1 else self._inject(state, x0, adapter)
        if self.config.loop_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(
                self._apply_unit, u, unit, unit_blocks, t, kv_caches, use_reentrant=False
            )
        return self._apply_unit(u, unit, unit_blocks, t, kv_caches)

    def _run_unit(self, x0, unit, unit_blocks, adapter, num_loops, threshold, kv_caches):
        batch = x0.shape[0]
        cfg = self.config
        noisy = cfg.loop_noise_scale > 0 and (self.training or cfg.loop_noise_in_eval)
        state = x0 + cfg.loop_noise_scale * torch.randn_like(x0) if noisy else x0
        iterations = torch.full((batch,), num_loops, dtype=torch.long, device=x0.device)
        record = cfg.loops_representation
        need_delta = record or threshold is not None
        states = [state.detach()] if record else None
        deltas = [] if record else None
        # Iterations up to `no_grad_until` build no graph (truncated backprop).
        no_grad_until = 0
        if cfg.loop_backprop_depth > 0 and self.training:
            no_grad_until = max(num_loops - cfg.loop_backprop_depth, 0)
        active = None  # indices of sequences still iterating; None means all of them
        finite = [] if getattr(self, "last_finite", None) is not None else None
        for t in range(1, num_loops + 1):
            with torch.set_grad_enabled(torch.is_grad_enabled() and t > no_grad_until):
                if active is None:
                    new_state = self._step(state, x0, t, unit, unit_blocks, adapter, kv_caches)
                    delta = relative_change(new_state, state) if need_delta else None
                else:
                    # A generation cache must write and read the rows still iterating only.
                    sub_caches = None if kv_caches is None else kv_caches.rows(active)
                    new_sub = self._step(
                        state[active], x0[active], t, unit, unit_blocks, adapter, sub_caches
                    )
                    delta_sub = relative_change(new_sub, state[active]) if need_delta else None
                    new_state = state.index_copy(0, active, new_sub)
                    if need_delta:
                        delta = torch.full((batch,), float("nan"), device=x0.device)
                        delta[active] = delta_sub.detach().to(delta.dtype)
            state = new_state
            if finite is not None:
                finite.append(torch.isfinite(state).all())
            if record:
                states.append(state.detach())
                deltas.append(delta.detach().float())
            if threshold is not None and t >= 2 and t < num_loops:
                still = torch.arange(batch, device=x0.device) if active is None else active
                converged = delta[still] < threshold
                if bool(converged.any()):
                    iterations[still[converged]] = t
                    active = still[~converged]
                    if active.numel() == 0:
                        break
        if finite is not None:
            self.last_finite.append(torch.stack(finite))
        if record:
            # Sequences (or the whole batch) that stopped keep their state for the rest.
            while len(states) < num_loops + 1:
                states.append(state.detach())
                deltas.append(torch.full((batch,), float("nan"), device=x0.device))
            unit_trace = UnitTrace(
                blocks=unit,
                states=torch.stack(states),
                deltas=torch.stack(deltas),
                iterations=iterations.clone(),
            )
        else:
            unit_trace = None
        return state, iterations, unit_trace
