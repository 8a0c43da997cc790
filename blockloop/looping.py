"""The looping mechanism: which blocks loop, how they iterate, when they stop, what is recorded.

Everything that makes a looped transformer different from a plain one lives here, written to
read like its definition, together with the answers other modules ask of a configuration (is it
looped, its effective depth, which iteration counts it can run, whether a training step may
leave parameters without gradient). No other module restates these rules.

Loop groups. `loop_groups = [[first, last], ...]` (inclusive block ranges, disjoint, increasing,
any size) are looped; `loop_counts[g]` is group g's iteration count (default `max_loops`).
`loop_center_idx = c, loop_radius = r` is the shorthand for the one group [c - r, c + r]. Blocks
outside every group run once, in order. A looped unit R is a whole group (tied looping) or one
block of it (untied: each block iterates on its own, in index order). Let x0 be the unit's input
and T its group's count:

    s0 = x0 + sigma * eps          loop_state_init "input" (noise in training, or loop_noise_in_eval)
    s0 = sigma * eps               loop_state_init "noise" (the recurrent-depth recipe)
    u1 = s0                        "input" init: the first iteration sees x0 itself
    ut = inject(s(t-1), x0)        t >= 2 ("input" init), t >= 1 ("noise" init), where
         inject(s, x0) = s                       injection "none"
                         s + x0                  injection "add"
                         A([s ; x0])             injection "concat"
    ut = N(ut)                     with loop_state_norm "layernorm" (a LayerNorm per unit)
    st = R(ut)                     t = 1 .. T; the unit's output is sT

`A(z) = s + W z + b`, with W, b starting at zero: a fresh adapter passes s through exactly, and
weight decay pulls it back towards pass-through. eps ~ N(0, I); outside training, "noise" init
draws eps from a generator seeded with EVAL_NOISE_SEED, one value per (absolute position,
channel): evaluation is reproducible and a sequence's result does not depend on its batch.

Automatic exit (`automatic_loop_exit`; in training only with `automatic_loop_exit_in_training`),
checked after iterations t = 2 .. T-1 against `automatic_loop_exit_threshold`, with a per-token
criterion c_t (L2 over channels; p_t the next-token distribution of s_t through ln_f and lm_head,
the logit lens; natural logarithms):

    "relative_change"  c_t = ||s_t - s_(t-1)|| / (||s_(t-1)|| + 1e-6)        (dimensionless)
    "kl"               c_t = KL(p_t || p_(t-1)) = sum_v p_t log(p_t / p_(t-1))  (nats)
    "entropy"          c_t = H(p_t) = -sum_v p_t log p_t                       (nats)
    "delta_change"     c_t = |delta_t - delta_(t-1)|, delta the relative change (dimensionless)

`automatic_loop_exit_granularity`: "sequence" stops a sequence at the first t where the mean of
c_t over its tokens is below the threshold; "token" stops each token on its own, which is causal
(a token's output depends only on the tokens up to it). A token that stopped at e keeps s_e, and
at later iterations the others read its keys and values from iteration e, the rule of the
generation cache (`blockloop.sampling`), so a full forward pass with token exit equals cached
decoding with token exit.

Training options: `loop_sampling` draws each group's iteration count for a step
(`sample_num_loops`, one generator per group, seeded by the trainer from (seed, step, group))
around the count `loop_schedule` gives that step (`scheduled_counts`: the trained count, or
progressive looping, or a curriculum ramping it up; formulas there);
`loop_backprop_depth = k > 0` runs all but the last k iterations of each unit without a graph;
`loop_checkpointing` recomputes each iteration's activations in the backward pass.

Trace (`GPT.last_loop_trace`, only with `loops_representation=True`): a `LoopTrace` whose `units`
hold one `UnitTrace` per looped unit, in execution order: `group` (its group index), `blocks`,
`x0` (B, L, C), `states` (T+1, B, L, C) detached (`states[t]` is s_t; a sequence or token that
exited at e keeps s_e), `deltas` (T, B): the mean relative change over the sequence's tokens (NaN for iterations a
sequence did not run), `iterations`: int64 (B,) per sequence, or (B, L) per token with token
granularity. `GPT.last_loop_iterations` holds the per-unit `iterations` even with tracing off.

Generation cache (`kv_caches`): iteration t of block i reads and writes `kv_caches.get(i, t)`; once
some sequences have exited, the remaining iterations run on the active rows through
`kv_caches.rows(active)`, and the cache fills in the exited rows' later iterations.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

INJECTION_MODES = ("none", "add", "concat")
LOOP_SAMPLING_MODES = ("fixed", "poisson_lognormal", "uniform")
LOOP_SCHEDULES = ("constant", "progressive", "curriculum")
STATE_INITS = ("input", "noise")
STATE_NORMS = ("none", "layernorm")
EXIT_CRITERIA = ("relative_change", "kl", "entropy", "delta_change")
EXIT_GRANULARITIES = ("sequence", "token")
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
# The seed of the evaluation noise of "noise" state initialisation (see the module docstring).
EVAL_NOISE_SEED = 20251129


# ----------------------------------------------------------------------------------------------
# Which blocks loop


@dataclass(frozen=True)
class LoopGroup:
    """Blocks `first .. last` (inclusive), looped `count` times by default."""

    first: int
    last: int
    count: int

    @property
    def blocks(self) -> tuple[int, ...]:
        return tuple(range(self.first, self.last + 1))


def group_ranges(config) -> list[tuple[int, int]]:
    """The looped ranges [(first, last), ...] of a config: `loop_groups`, or the one group of
    `loop_center_idx`/`loop_radius`; [] for a plain model."""
    if config.loop_groups:
        return [(int(a), int(b)) for a, b in config.loop_groups]
    if config.loop_center_idx < 0:
        return []
    c, r = config.loop_center_idx, config.loop_radius
    return [(c - r, c + r)]


def trained_counts(config) -> list[int]:
    """Each group's trained iteration count: `loop_counts`, else `max_loops` for every group."""
    ranges = group_ranges(config)
    return list(config.loop_counts) if config.loop_counts else [config.max_loops] * len(ranges)


@dataclass(frozen=True)
class LoopPlan:
    """The loop groups of a model and how they split into looped units."""

    groups: tuple[LoopGroup, ...]
    tied: bool

    @classmethod
    def from_config(cls, config) -> "LoopPlan | None":
        ranges = group_ranges(config)
        if not ranges:
            return None
        counts = trained_counts(config)
        groups = tuple(LoopGroup(a, b, n) for (a, b), n in zip(ranges, counts))
        return cls(groups=groups, tied=config.tied_looping)

    @property
    def units(self) -> list[tuple[int, ...]]:
        """The looped units in execution order: each group whole (tied) or block by block."""
        return [blocks for _, blocks in self.unit_list]

    @property
    def unit_groups(self) -> list[int]:
        """The group index of each looped unit, in execution order."""
        return [g for g, _ in self.unit_list]

    @property
    def unit_list(self) -> list[tuple[int, tuple[int, ...]]]:
        out = []
        for g, group in enumerate(self.groups):
            parts = [group.blocks] if self.tied else [(i,) for i in group.blocks]
            out += [(g, part) for part in parts]
        return out

    @property
    def start(self) -> int:
        """The first looped block."""
        return self.groups[0].first

    @property
    def stop(self) -> int:
        """One past the last looped block."""
        return self.groups[-1].last + 1

    @property
    def num_blocks(self) -> int:
        """Looped blocks, all groups together."""
        return sum(len(g.blocks) for g in self.groups)

    def counts(self, num_loops=None) -> list[int]:
        """Iteration counts per group for an override: None (the trained counts), one int for
        every group, or a list with one count per group."""
        if num_loops is None:
            return [g.count for g in self.groups]
        if isinstance(num_loops, (list, tuple)):
            if len(num_loops) != len(self.groups):
                raise ValueError(
                    f"num_loops={list(num_loops)}: give one count per loop group "
                    f"({len(self.groups)}), or one number for all"
                )
            return [int(n) for n in num_loops]
        return [int(num_loops)] * len(self.groups)


def block_applications(plan: LoopPlan, n_layer: int, unit_iterations) -> torch.Tensor:
    """Blocks applied to each sequence (B,) or token (B, L) in a forward pass whose looped
    units ran `unit_iterations` (`GPT.last_loop_iterations`): n_layer + sum over units of
    len(unit) * (iterations - 1)."""
    total = torch.full(unit_iterations[0].shape, float(n_layer), device=unit_iterations[0].device)
    for blocks, its in zip(plan.units, unit_iterations):
        total = total + len(blocks) * (its.float() - 1)
    return total


def group_means(plan: LoopPlan, unit_values) -> torch.Tensor:
    """The mean of each group's per-unit values, float (G,): `unit_values` holds one tensor per
    looped unit in execution order (e.g. `GPT.last_loop_iterations`), each averaged first."""
    per_unit = [v.float().mean() for v in unit_values]
    groups = plan.unit_groups
    return torch.stack([
        torch.stack([m for m, g in zip(per_unit, groups) if g == k]).mean()
        for k in range(len(plan.groups))
    ])


# ----------------------------------------------------------------------------------------------
# What other modules ask about a configuration's loop. `config` is a GPTConfig (or anything with
# its looping keys).


def is_looped(config) -> bool:
    """Whether the config has a looped range, whatever its iteration count."""
    return bool(group_ranges(config))


def effective_depth(config, num_loops=None) -> int:
    """Blocks applied per forward pass with the groups at `num_loops` iterations (None: the
    trained counts; one int for all groups, or a list per group); `n_layer` for a plain model."""
    plan = LoopPlan.from_config(config)
    if plan is None:
        return config.n_layer
    counts = plan.counts(num_loops)
    return config.n_layer + sum(len(g.blocks) * (t - 1) for g, t in zip(plan.groups, counts))


def unit_has_adapter(config, group: int) -> bool:
    """Whether the units of `group` own a concat adapter: "concat" injection, and the adapter
    is used (from the second iteration on, or from the first with "noise" state init)."""
    if config.injection_mode != "concat":
        return False
    return trained_counts(config)[group] > 1 or config.loop_state_init == "noise"


def has_adapters(config) -> bool:
    """Whether any looped unit owns a concat adapter."""
    return any(unit_has_adapter(config, g) for g in range(len(group_ranges(config))))


def max_runnable_loops(config) -> int:
    """The largest count the model can run in every group (1 where a "concat" group was built
    for one iteration: it has no adapter for a second)."""
    for g in range(len(group_ranges(config))):
        if config.injection_mode == "concat" and not unit_has_adapter(config, g):
            return 1
    return MAX_LOOPS_LIMIT


def _runnable_in_group(config, group: int) -> int:
    if config.injection_mode == "concat" and not unit_has_adapter(config, group):
        return 1
    return MAX_LOOPS_LIMIT


def check_num_loops(config, num_loops, key: str = "num_loops") -> None:
    """Raise ValueError naming `key` unless the model can run `num_loops` iterations (one
    integer for every group, or a list with one per group)."""
    values = list(num_loops) if isinstance(num_loops, (list, tuple)) else None
    ranges = group_ranges(config)
    if values is not None and len(values) != max(len(ranges), 1):
        raise ValueError(f"{key}={values}: give one count per loop group ({len(ranges)})")
    for g, n in enumerate(values if values is not None else [num_loops]):
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"{key}={num_loops!r}: must be an integer")
        top = _runnable_in_group(config, g) if values is not None else max_runnable_loops(config)
        if not 1 <= n <= top:
            why = (
                "this model uses 'concat' injection and was built with max_loops=1, so it has "
                "no adapters and can only run 1 iteration"
                if top == 1 else f"iteration counts are limited to [1, {MAX_LOOPS_LIMIT}]"
            )
            raise ValueError(f"{key}={num_loops}: {why}")


def scaling_loop_counts(config, extra=()) -> list[int]:
    """Iteration counts (one for every group) for a test-time loop-scaling curve: 1 .. twice the
    largest trained count, the SCALING_BASE_COUNTS, and `extra`, limited to what the model can
    run ([] for a plain model)."""
    if not is_looped(config):
        return []
    top = max(trained_counts(config))
    counts = set(range(1, 2 * top + 1)) | set(SCALING_BASE_COUNTS) | set(extra)
    return sorted(c for c in counts if 1 <= c <= max_runnable_loops(config))


def may_skip_gradients(config) -> bool:
    """Whether some training step may leave parameters without a gradient (DDP must then look
    for unused parameters): the concat adapters when a step's count is 1 (they act from
    iteration 2), as a sampled count or an early step of a loop schedule may be, and every
    block before a loop under truncated backprop without injection (no path back to x0)."""
    if not is_looped(config):
        return False
    varying = config.loop_sampling != "fixed" or config.loop_schedule != "constant"
    sampled_one = has_adapters(config) and varying
    truncated = config.loop_backprop_depth > 0 and config.injection_mode == "none"
    return sampled_one or truncated


# ----------------------------------------------------------------------------------------------
# The loop keys' rules (GPTConfig.validate calls this): a ValueError names the key and the fix.


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r}: must be one of {', '.join(repr(m) for m in allowed)}")


def validate_loop_keys(config) -> None:
    """Raise ValueError naming the first looping key of `config` that is out of range or
    contradicts another; `config` has GPTConfig's keys, types already checked."""
    _validate_ranges(config)
    _validate_counts(config)
    _one_of("loop_input_injection", config.loop_input_injection, INJECTION_MODES)
    if config.concatenate_initial_representation and config.loop_input_injection not in (
        "none", "concat",
    ):
        raise ValueError(
            "concatenate_initial_representation=True asks for 'concat' injection, but "
            f"loop_input_injection={config.loop_input_injection!r}; set only one of them"
        )
    for key in ("loop_noise_scale", "automatic_loop_exit_threshold"):
        value = getattr(config, key)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{key}={value}: must be a finite number >= 0")
    _one_of("loop_sampling", config.loop_sampling, LOOP_SAMPLING_MODES)
    _validate_schedule(config)
    _one_of("loop_state_init", config.loop_state_init, STATE_INITS)
    _one_of("loop_state_norm", config.loop_state_norm, STATE_NORMS)
    _one_of("automatic_loop_exit_criterion", config.automatic_loop_exit_criterion, EXIT_CRITERIA)
    _one_of("automatic_loop_exit_granularity", config.automatic_loop_exit_granularity,
            EXIT_GRANULARITIES)
    if config.loop_state_init == "noise" and config.injection_mode == "none":
        raise ValueError(
            "loop_state_init='noise' starts the loop from noise, so the input must be injected: "
            "set loop_input_injection='add' or 'concat'"
        )
    if config.loop_backprop_depth < 0:
        raise ValueError(
            f"loop_backprop_depth={config.loop_backprop_depth}: must be >= 0 "
            f"(0 backpropagates through every iteration)"
        )
    if config.loop_backprop_depth > 0 and config.automatic_loop_exit_in_training:
        # The gradient window is the last k of the planned iterations; exiting earlier could
        # leave no iteration carrying gradient at all.
        raise ValueError(
            "loop_backprop_depth > 0 cannot be combined with "
            "automatic_loop_exit_in_training=True; use one of them"
        )


def _validate_schedule(config) -> None:
    _one_of("loop_schedule", config.loop_schedule, LOOP_SCHEDULES)
    fraction = config.loop_schedule_fraction
    if not 0 < fraction <= 1:  # also refuses NaN
        raise ValueError(
            f"loop_schedule_fraction={fraction}: must be in (0, 1], the fraction of max_iters "
            f"the schedule takes (e.g. 0.5)"
        )
    if config.loop_schedule == "progressive" and fraction == 1:
        raise ValueError(
            "loop_schedule='progressive' with loop_schedule_fraction=1 would switch to the full "
            "count after the last step, so the model would never train at it: use a fraction "
            "below 1 (e.g. 0.5)"
        )
    if config.loop_schedule != "constant" and not group_ranges(config):
        raise ValueError(
            f"loop_schedule={config.loop_schedule!r} schedules the iteration count of a loop, "
            f"but the model has none: set loop_center_idx or loop_groups, or "
            f"loop_schedule='constant'"
        )


def _validate_ranges(config) -> None:
    if config.loop_center_idx < -1:
        raise ValueError(
            f"loop_center_idx={config.loop_center_idx}: must be -1 (no looping) "
            f"or a block index in [0, {config.n_layer})"
        )
    if config.loop_radius < 0:
        raise ValueError(f"loop_radius={config.loop_radius}: must be >= 0")
    if config.loop_groups and config.loop_center_idx >= 0:
        raise ValueError(
            f"loop_groups={config.loop_groups} and loop_center_idx={config.loop_center_idx}: "
            f"set one form only (loop_center_idx/loop_radius is the shorthand for one group)"
        )
    if config.loop_center_idx >= 0:
        lo, hi = config.loop_center_idx - config.loop_radius, config.loop_center_idx + config.loop_radius
        if lo < 0 or hi >= config.n_layer:
            raise ValueError(
                f"loop_center_idx={config.loop_center_idx}, loop_radius={config.loop_radius}: "
                f"the looped range is blocks {lo}..{hi}, which leaves [0, {config.n_layer}) "
                f"(n_layer={config.n_layer}); choose a centre and radius with "
                f"radius <= centre <= n_layer - 1 - radius"
            )
    _validate_groups(config)


def _validate_groups(config) -> None:
    groups, previous = config.loop_groups, -1
    for g in groups:
        if not (
            isinstance(g, (list, tuple)) and len(g) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in g)
        ):
            raise ValueError(
                f"loop_groups={groups}: each group is [first, last], two block indices, "
                f"e.g. loop_groups=[[2, 5]]"
            )
        first, last = g
        if not 0 <= first <= last < config.n_layer:
            raise ValueError(
                f"loop_groups={groups}: group {list(g)} must satisfy 0 <= first <= last < "
                f"n_layer={config.n_layer}"
            )
        if first <= previous:
            raise ValueError(
                f"loop_groups={groups}: groups must be disjoint and in increasing block order"
            )
        previous = last


def _validate_counts(config) -> None:
    if not 1 <= config.max_loops <= MAX_LOOPS_LIMIT:
        raise ValueError(f"max_loops={config.max_loops}: must be in [1, {MAX_LOOPS_LIMIT}]")
    counts = config.loop_counts
    if not counts:
        return
    if len(counts) != len(group_ranges(config)):
        raise ValueError(
            f"loop_counts={counts}: give one count per loop group ({len(group_ranges(config))})"
        )
    for n in counts:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_LOOPS_LIMIT:
            raise ValueError(
                f"loop_counts={counts}: each count must be an integer in [1, {MAX_LOOPS_LIMIT}]"
            )


# ----------------------------------------------------------------------------------------------
# How the loop runs


@dataclass
class UnitTrace:
    """One looped unit's recorded loop (see the module docstring for shapes)."""

    blocks: tuple[int, ...]
    states: torch.Tensor
    deltas: torch.Tensor
    iterations: torch.Tensor
    group: int = 0
    x0: torch.Tensor | None = None  # the unit's input (B, L, C), detached


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


def token_relative_change(new, old):
    """delta per token, (B, L): ||new - old|| / (||old|| + 1e-6), L2 over channels.

    Computed in float32 at least: in a bf16 model the rounding of the difference alone would
    exceed thresholds like 1e-3 and change exit decisions.
    """
    new, old = new.float(), old.float()
    return (new - old).norm(dim=-1) / (old.norm(dim=-1) + 1e-6)


def relative_change(new, old):
    """delta per sequence, (B,): the mean over tokens of `token_relative_change`."""
    return token_relative_change(new, old).mean(dim=-1)


def sample_num_loops(config, generator: torch.Generator, mean: int | None = None) -> int:
    """The iteration count of a group for one training step, with mean `mean` (default
    `max_loops`).

    "poisson_lognormal": 1 + Poisson(exp(tau)), tau ~ N(log(mean - 1) - sigma^2/2, sigma), the
    recurrent-depth recipe (Geiping et al. 2025, "Scaling up test-time compute with latent
    reasoning"). "uniform": uniform over 1 .. 2*mean - 1. "fixed": mean. Both random draws are
    capped at SAMPLED_LOOPS_CAP_FACTOR * mean.
    """
    mean = config.max_loops if mean is None else mean
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


def sample_loop_counts(config, generators: list[torch.Generator], means=None):
    """One draw per group (`generators[g]` for group g) around `means[g]` (default: the trained
    counts); an int for a one-group model (what `num_loops` then takes), else a list."""
    means = trained_counts(config) if means is None else means
    counts = [sample_num_loops(config, gen, n) for gen, n in zip(generators, means)]
    return counts[0] if len(counts) == 1 else counts


# ----------------------------------------------------------------------------------------------
# Loop schedules: each training step's iteration count per group


def _schedule_fraction(config) -> Fraction:
    # The fraction as written (0.3 is 3/10, not the binary float just below it), so that
    # f * max_iters lands on the step one expects, and exact arithmetic, so that
    # `scheduled_counts` and `schedule_steps` can never disagree by a rounding.
    return Fraction(repr(float(config.loop_schedule_fraction)))


def switch_step(config, max_iters: int) -> int:
    """The first step of a "progressive" run at the full count: s = floor(f * max_iters + 1/2),
    f = loop_schedule_fraction (f * max_iters rounded half up, so in [0, max_iters])."""
    return math.floor(_schedule_fraction(config) * max_iters + Fraction(1, 2))


def scheduled_counts(config, iter_num: int, max_iters: int) -> list[int]:
    """Each group's iteration count at training step `iter_num` (0-based) of a `max_iters`-step
    run under `loop_schedule`: the count a step runs with "fixed" `loop_sampling`, the mean a
    random `loop_sampling` draws around otherwise. With T the group's trained count
    (`trained_counts`), f = `loop_schedule_fraction`, N = max_iters, i = iter_num:

        "constant"     T
        "progressive"  1 for i < s, T from s on, s = floor(f N + 1/2)  (`switch_step`)
        "curriculum"   floor(m + 1/2), m = 1 + (T - 1) min(1, i / (f N)): the mean ramps
                       linearly from 1 at step 0 to T at step f N and stays there; it is
                       rounded half up because the samplers take an integer mean

    Every group follows the schedule with its own T, switching (progressive) at the same step.
    The counts depend on (config, iter_num, max_iters) alone, so a resumed run continues the
    schedule exactly (with the same max_iters); steps from max_iters on get T.

    Sources: training a recurrence at a reduced count first and raising it is a depth
    curriculum in the family of gradual stacking (Saunshi et al. 2024, "On the inductive bias
    of stacking towards improving reasoning"), and ramping the mean of the sampled recurrence
    over training is used for recurrent-depth models (McLeish et al. 2025, "Teaching
    pretrained language models to think deeper with retrofitted recurrence", building on
    Geiping et al. 2025, "Scaling up test-time compute with latent reasoning"). The forms here
    (one switch step; a linear ramp from 1) are this module's choices, not a reproduction of
    those recipes.
    """
    counts = trained_counts(config)
    if config.loop_schedule == "constant":
        return counts
    if config.loop_schedule == "progressive":
        return [1 if iter_num < switch_step(config, max_iters) else t for t in counts]
    ramp = _schedule_fraction(config) * max_iters
    progress = Fraction(1) if iter_num >= ramp else Fraction(iter_num) / ramp
    return [math.floor(1 + (t - 1) * progress + Fraction(1, 2)) for t in counts]


def _change_steps(config, max_iters: int) -> list[int]:
    """The steps where some group's scheduled count changes (some may lie outside the run)."""
    if config.loop_schedule == "progressive":
        return [switch_step(config, max_iters)]
    if config.loop_schedule == "constant":
        return []
    ramp = _schedule_fraction(config) * max_iters
    # A curriculum count reaches k >= 2 at the first step i with 1 + (T-1) i / ramp + 1/2 >= k,
    # i >= (k - 3/2) ramp / (T-1); past the ramp every such inequality holds.
    return [math.ceil((k - Fraction(3, 2)) * ramp / (t - 1))
            for t in trained_counts(config) for k in range(2, t + 1)]


def schedule_steps(config, max_iters: int) -> list[tuple[list[int], int]]:
    """The steps 0 .. max_iters-1 of a run as (scheduled counts per group, number of steps)
    pairs, consecutive runs of equal counts in order: `sum(n * cost(counts))` is the run's
    total for any per-step cost, at a few terms per group rather than one per step."""
    inside = {s for s in _change_steps(config, max_iters) if 0 < s < max_iters}
    edges = sorted({0, max_iters} | inside) if max_iters > 0 else []
    return [(scheduled_counts(config, a, max_iters), b - a) for a, b in itertools.pairwise(edges)]


def mean_scheduled_loops(config, max_iters: int) -> list[float]:
    """Each group's scheduled count averaged over the steps of a `max_iters`-step run
    (the trained counts for max_iters = 0); for a random `loop_sampling` the mean of the draws'
    means, which is the expected count up to the samplers' cap."""
    steps = schedule_steps(config, max_iters)
    if not steps:
        return [float(t) for t in trained_counts(config)]
    return [sum(counts[g] * n for counts, n in steps) / max_iters
            for g in range(len(steps[0][0]))]


def step_num_loops(config, iter_num: int, max_iters: int, generators: list[torch.Generator]):
    """The `num_loops` of training step `iter_num` of a `max_iters`-step run: None where every
    step runs the trained counts (constant schedule, fixed sampling: the model's default),
    else the scheduled counts (`scheduled_counts`) with "fixed" sampling or one draw per group
    around them (`generators[g]` for group g); an int for a one-group model, else a list."""
    if config.loop_schedule == "constant" and config.loop_sampling == "fixed":
        return None
    means = scheduled_counts(config, iter_num, max_iters)
    if config.loop_sampling != "fixed":
        return sample_loop_counts(config, generators, means)
    return means[0] if len(means) == 1 else means


@dataclass(frozen=True)
class ExitRule:
    """When a unit stops iterating: criterion below threshold, per sequence or per token."""

    threshold: float
    criterion: str
    granularity: str


class _Criterion:
    """Computes c_t per token (B, L) for one unit, remembering what the next iteration needs
    (the previous relative change, the previous lens log-probabilities)."""

    def __init__(self, rule: ExitRule, lens):
        self.rule = rule
        self.lens = lens
        self.prev = None

    def __call__(self, new, old, rows=None):
        kind = self.rule.criterion
        if kind in ("relative_change", "delta_change"):
            value = token_relative_change(new, old)
        else:
            value = F.log_softmax(self.lens(new).float(), dim=-1)
        prev = None if self.prev is None else (self.prev if rows is None else self.prev[rows])
        self._remember(value.detach(), rows)
        if kind == "relative_change":
            return value
        if kind == "entropy":
            return -(value.exp() * value).sum(-1)
        if prev is None:  # t = 1: nothing to compare with yet (no exit is checked at t = 1)
            return torch.full(value.shape[:2], float("inf"), device=value.device)
        if kind == "kl":
            return (value.exp() * (value - prev)).sum(-1)
        return (value - prev).abs()

    def _remember(self, value, rows) -> None:
        if rows is None or self.prev is None:
            self.prev = value
        else:
            self.prev = self.prev.index_copy(0, rows, value)


class _FrozenKV:
    """Token exit: the keys and values a block sees at an iteration, where a token that stopped
    keeps those of the last iteration it computed (the generation cache's rule). Wraps the
    generation cache's layer when there is one."""

    def __init__(self, store: dict, key, active, inner=None):
        self.store, self.key, self.active, self.inner = store, key, active, inner

    @property
    def past_length(self) -> int:
        """The position of the first new token (RoPE reads it): the cache's, else 0."""
        return 0 if self.inner is None else self.inner.past_length

    def extend(self, k, v):
        if self.key in self.store:
            keep = ~self.active[:, None, :, None]
            k_old, v_old = self.store[self.key]
            k, v = torch.where(keep, k_old, k), torch.where(keep, v_old, v)
        self.store[self.key] = (k, v)
        if self.inner is not None:
            return self.inner.extend(k, v)
        t = k.shape[2]
        mask = None if t == 1 else torch.ones(t, t, dtype=torch.bool, device=k.device).tril()
        return k, v, mask


class _FrozenKVView:
    def __init__(self, store, active, inner):
        self.store, self.active, self.inner = store, active, inner

    def get(self, block_idx: int, iteration: int):
        inner = None if self.inner is None else self.inner.get(block_idx, iteration)
        return _FrozenKV(self.store, block_idx, self.active, inner)


class UnitModules(nn.ModuleDict):
    """Modules per looped unit, indexed by the unit's position (an int, as in a ModuleList)
    and iterated as modules; units without one are absent. The state-dict names are a
    ModuleList's (`adapters.0.proj.weight`), so checkpoints of either kind load."""

    def __getitem__(self, key):
        return super().__getitem__(str(key))

    def __contains__(self, key) -> bool:
        return super().__contains__(str(key))

    def __iter__(self):
        return iter(self.values())


class LoopRunner(nn.Module):
    """Runs a block stack with its loop groups; owns the concat adapters and state norms (one
    per looped unit, keyed by the unit's index in execution order)."""

    def __init__(self, config, plan: LoopPlan):
        super().__init__()
        self.plan = plan
        # The config's own names are used throughout (config.max_loops, ...), so a search for
        # an option finds every use; the config is read, never mutated, here.
        self.config = config
        units = plan.unit_list
        adapters = {str(u): ConcatAdapter(config.n_embd, config.bias)
                    for u, (g, _) in enumerate(units) if unit_has_adapter(config, g)}
        # ModuleDict keys "0", "1", ... give the state-dict names of a ModuleList.
        self.adapters = UnitModules(adapters) if adapters else None
        self.state_norms = None
        if config.loop_state_norm == "layernorm":
            self.state_norms = UnitModules(
                {str(u): nn.LayerNorm(config.n_embd, bias=config.bias) for u in range(len(units))}
            )
        self._eval_noise = {}

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
        """Zero every adapter: exactly pass-through (their initialisation)."""
        if self.adapters is not None:
            for adapter in self.adapters:
                adapter.reset_parameters()

    def adapter_params_per_unit(self) -> int:
        """Parameters of one concat adapter (0 without adapters)."""
        if self.adapters is None:
            return 0
        return sum(p.numel() for p in next(iter(self.adapters)).parameters())

    def forward(self, x, blocks, num_loops=None, loop_exit=None, exit_threshold=None,
                kv_caches=None, lens=None, start_unit: int = 0, exit_granularity=None,
                trace: bool | None = None):
        """Apply the block stack to `x` (B, L, C): blocks outside the groups once, each looped
        unit for its group's count. `num_loops`: None (trained counts), an int for every group
        or a list per group. `lens(s) -> logits` is the logit lens ("kl"/"entropy" exit).
        `start_unit = k` continues the stack after looped unit k-1 (for analysis);
        `exit_granularity` overrides the config's ("sequence" or "token"), `trace` its
        `loops_representation`.
        Returns (output (B, L, C), iterations per unit, LoopTrace or None)."""
        counts = self.plan.counts(num_loops)
        check_num_loops(self.config, counts if len(counts) > 1 else counts[0])
        rule = self._exit_rule(loop_exit, exit_threshold, exit_granularity)
        record = self.config.loops_representation if trace is None else trace
        trace = LoopTrace() if record else None
        # Outside training, whether each iteration's state is finite is kept (no host sync) so
        # a diverged run can be reported with the iteration where it broke (`nonfinite_onset`).
        self.last_finite = None if self.training else []
        past = 0 if kv_caches is None else kv_caches.past_length
        units, iterations = self.plan.unit_list, []
        position = units[start_unit - 1][1][-1] + 1 if start_unit > 0 else 0
        for u in range(start_unit, len(units)):
            g, unit = units[u]
            x = self._run_once(x, blocks, range(position, unit[0]), kv_caches)
            x, used, unit_trace = self._run_unit(u, x, blocks, counts[g], rule, kv_caches,
                                                 lens, past, record)
            iterations.append(used)
            if trace is not None:
                trace.units.append(unit_trace)
            position = unit[-1] + 1
        x = self._run_once(x, blocks, range(position, len(blocks)), kv_caches)
        return x, iterations, trace

    @staticmethod
    def _run_once(x, blocks, indices, kv_caches):
        for i in indices:
            x = blocks[i](x, None if kv_caches is None else kv_caches.get(i, 1))
        return x

    def _exit_rule(self, loop_exit, exit_threshold, granularity=None) -> ExitRule | None:
        cfg = self.config
        if loop_exit is None:
            loop_exit = cfg.automatic_loop_exit and (
                not self.training or cfg.automatic_loop_exit_in_training
            )
        if not loop_exit:
            return None
        threshold = cfg.automatic_loop_exit_threshold if exit_threshold is None else exit_threshold
        granularity = granularity or cfg.automatic_loop_exit_granularity
        _one_of("exit_granularity", granularity, EXIT_GRANULARITIES)
        return ExitRule(threshold, cfg.automatic_loop_exit_criterion, granularity)

    def _initial_state(self, x0, past: int):
        cfg = self.config
        sigma = cfg.loop_noise_scale
        if cfg.loop_state_init == "noise":
            if self.training:
                return sigma * torch.randn_like(x0)
            return (sigma * self._noise_at(past, x0)).expand_as(x0).contiguous()
        noisy = sigma > 0 and (self.training or cfg.loop_noise_in_eval)
        return x0 + sigma * torch.randn_like(x0) if noisy else x0

    def _noise_at(self, past: int, like):
        """The evaluation noise of positions past .. past+L-1 (EVAL_NOISE_SEED), (1, L, C)."""
        key = (like.device, like.dtype)
        if key not in self._eval_noise:
            gen = torch.Generator().manual_seed(EVAL_NOISE_SEED)
            noise = torch.randn(self.config.block_size, like.shape[-1], generator=gen)
            self._eval_noise[key] = noise.to(device=like.device, dtype=like.dtype)
        return self._eval_noise[key][past: past + like.shape[1]].unsqueeze(0)

    def _inject(self, state, x0, u: int):
        mode = self.config.injection_mode
        if mode == "none":
            return state
        if mode == "add":
            return state + x0
        return self.adapters[u](state, x0)

    def _apply_unit(self, x, unit, unit_blocks, t, kv_caches):
        if kv_caches is None:
            for block in unit_blocks:
                x = block(x)
            return x
        for i, block in zip(unit, unit_blocks):
            x = block(x, kv_caches.get(i, t))
        return x

    def _step(self, state, x0, t, u, unit, unit_blocks, kv_caches):
        """One iteration of looped unit `u`: s_t = R(N(u_t))."""
        first_plain = t == 1 and self.config.loop_state_init == "input"
        x = state if first_plain else self._inject(state, x0, u)
        if self.state_norms is not None:
            x = self.state_norms[u](x)
        if self.config.loop_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(
                self._apply_unit, x, unit, unit_blocks, t, kv_caches, use_reentrant=False
            )
        return self._apply_unit(x, unit, unit_blocks, t, kv_caches)

    def _run_unit(self, u, x0, blocks, num_loops, rule, kv_caches, lens, past, record):
        unit = self.plan.unit_list[u][1]
        run = _UnitRun(self, u, unit, [blocks[i] for i in unit], x0, num_loops, rule, lens, past,
                       record)
        if rule is not None and rule.granularity == "token":
            run.iterate_tokens(kv_caches)
        else:
            run.iterate_sequences(kv_caches)
        return run.state, run.iterations, run.trace()


class _UnitRun:
    """One looped unit's iterations for one forward pass: the state, the exit bookkeeping and
    the recorded trajectory."""

    def __init__(self, runner, u, unit, unit_blocks, x0, num_loops, rule, lens, past, record):
        cfg = runner.config
        self.runner, self.u, self.unit, self.unit_blocks = runner, u, unit, unit_blocks
        self.x0, self.num_loops, self.rule = x0, num_loops, rule
        self.criterion = None if rule is None else _Criterion(rule, lens)
        self.state = runner._initial_state(x0, past)
        batch = x0.shape[0]
        shape = x0.shape[:2] if rule is not None and rule.granularity == "token" else (batch,)
        self.iterations = torch.full(shape, num_loops, dtype=torch.long, device=x0.device)
        self.record = record
        self.states = [self.state.detach()] if self.record else None
        self.deltas = [] if self.record else None
        self.finite = [] if getattr(runner, "last_finite", None) is not None else None
        # Iterations up to `no_grad_until` build no graph (truncated backprop).
        self.no_grad_until = 0
        if cfg.loop_backprop_depth > 0 and runner.training:
            self.no_grad_until = max(num_loops - cfg.loop_backprop_depth, 0)

    def _step(self, state, x0, t, kv_caches):
        return self.runner._step(state, x0, t, self.u, self.unit, self.unit_blocks, kv_caches)

    def _grad(self, t: int):
        return torch.set_grad_enabled(torch.is_grad_enabled() and t > self.no_grad_until)

    def _checks_exit(self, t: int) -> bool:
        return self.rule is not None and 2 <= t < self.num_loops

    def _keep(self, t: int, new_state, delta) -> None:
        """Record iteration t's state (and the per-sequence relative change for the trace)."""
        if self.finite is not None:
            self.finite.append(torch.isfinite(new_state).all())
        if self.record:
            self.states.append(new_state.detach())
            self.deltas.append(delta.detach().float())

    def iterate_sequences(self, kv_caches) -> None:
        """Whole sequences stop (mean criterion over their tokens); only the sequences still
        iterating are computed, so a sequence's output does not depend on its batch."""
        batch, device = self.x0.shape[0], self.x0.device
        active = None  # indices of sequences still iterating; None means all of them
        for t in range(1, self.num_loops + 1):
            rows = active
            with self._grad(t):
                old = self.state if rows is None else self.state[rows]
                x0 = self.x0 if rows is None else self.x0[rows]
                # A generation cache must write and read the rows still iterating only.
                caches = kv_caches if rows is None or kv_caches is None else kv_caches.rows(rows)
                new = self._step(old, x0, t, caches)
                self.state = new if rows is None else self.state.index_copy(0, rows, new)
            crit = None if self.criterion is None else self.criterion(new, old, rows)
            if self.record:
                delta = torch.full((batch,), float("nan"), device=device)
                delta[slice(None) if rows is None else rows] = relative_change(new, old).detach()
            self._keep(t, self.state, delta if self.record else None)
            if self._checks_exit(t):
                still = torch.arange(batch, device=device) if active is None else active
                converged = crit.mean(dim=-1) < self.rule.threshold
                if bool(converged.any()):
                    self.iterations[still[converged]] = t
                    active = still[~converged]
                    if active.numel() == 0:
                        break

    def iterate_tokens(self, kv_caches) -> None:
        """Each token stops on its own; every token is computed at every iteration (so the
        others read its frozen keys and values), and a stopped token's state is kept."""
        active = torch.ones(self.x0.shape[:2], dtype=torch.bool, device=self.x0.device)
        store = {}
        for t in range(1, self.num_loops + 1):
            view = _FrozenKVView(store, active, kv_caches)
            with self._grad(t):
                new = self._step(self.state, self.x0, t, view)
                old = self.state
                self.state = torch.where(active[..., None], new, old)
            crit = self.criterion(self.state, old)
            self._keep(t, self.state, relative_change(self.state, old))
            if self._checks_exit(t):
                stop = active & (crit < self.rule.threshold)
                self.iterations[stop] = t
                active = active & ~stop
                if not bool(active.any()):
                    break

    def trace(self):
        """This unit's UnitTrace (None without tracing); stopped runs keep their last state."""
        if self.finite is not None:
            self.runner.last_finite.append(torch.stack(self.finite))
        if not self.record:
            return None
        batch = self.x0.shape[0]
        while len(self.states) < self.num_loops + 1:
            self.states.append(self.state.detach())
            self.deltas.append(torch.full((batch,), float("nan"), device=self.x0.device))
        return UnitTrace(
            blocks=self.unit, states=torch.stack(self.states), deltas=torch.stack(self.deltas),
            iterations=self.iterations.clone(), group=self.runner.plan.unit_list[self.u][0],
            x0=self.x0.detach(),
        )
