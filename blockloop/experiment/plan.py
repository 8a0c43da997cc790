"""Planning: from a parsed experiment to the list of runs, with the matched plain references.

Each variant is resolved to a validated training config; keys the runner owns (`out_dir`,
`seed`, `max_iters`, `lr_decay_iters`) are set per run, so every run of a seed sees the same
training batches and every run sees the same evaluation batches. A FLOPs budget becomes
iterations per variant: the number whose expected training FLOPs (tokens per iteration x
training FLOPs per token, each step at its loop schedule's mean iteration counts) come nearest
the budget. A variant whose config is invalid becomes a planned failure with its error; the
others still run.

References. For every looped variant (`blockloop.looping.is_looped`) the planner adds the plain
models it is compared with, unless a variant with the same resolved config already exists.
They are listed in REFERENCES, kind -> a function from the looped variant's values and model
config to the plain reference's values:

- "param", *parameter-matched*: the same unique blocks, no loop;
- "depth", *depth-matched*: as many unique blocks as the looped model's effective depth
  (`blockloop.looping.effective_depth`).

The cross-model depth protocol (a section's `cross_model_depth`): before the references are
added, the named looped variant is expanded into one variant per trained count r
(`depth_protocol_variants`), each evaluated at every count of the protocol; its references
follow from the usual rule.

A new kind of reference (e.g. compute-matched) is one more function in REFERENCES; the report
shows every reference a variant names, and compares against "param" and "depth".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from blockloop.config import TrainConfig, all_keys, build_configs
from blockloop.errors import ConfigError, ExperimentError
from blockloop.experiment.files import RUNS_DIR, safe_name
from blockloop.experiment.spec import Experiment, Section, Variant
from blockloop.looping import effective_depth, is_looped, schedule_steps, trained_counts
from blockloop.model import GPT, LOOP_KEYS, GPTConfig
from blockloop.tasks import task_from_config

# Also set by the runner, but harmless to mention: post-training evaluation needs the final
# model in last.pt, and a child's progress bar would only clutter its log file.
RUNNER_FORCED = {"always_save_checkpoint": True, "progress": False}
# Keys that only concern looping: a plain reference drops them (eval_loops is a training key).
PLAIN_DROPPED_KEYS = LOOP_KEYS + ("eval_loops",)


@dataclass
class RunPlan:
    """One run: a variant at a seed, where it lives, what it trains and how it is evaluated."""

    run_id: str  # "<section>/<variant>-s<seed>", also its directory under runs/
    section: str
    variant: str
    seed: int
    role: str
    run_dir: Path
    values: dict  # flat config keys for build_configs, runner keys included
    evaluation: dict
    iters: int | None
    flops_per_iter: float | None
    spec_hash: str
    error: str | None = None  # a planning failure: the run is recorded as failed, not started

    def cost(self) -> float:
        """Estimated work, for ordering and ETA: training FLOPs (iterations if unknown)."""
        return (self.iters or 1) * (self.flops_per_iter or 1.0)

    def record(self, experiment: str) -> dict:
        """The fields every results.jsonl record of this run carries."""
        return {"run_id": self.run_id, "experiment": experiment, "section": self.section,
                "variant": self.variant, "seed": self.seed, "role": self.role,
                "spec_hash": self.spec_hash}


# ----------------------------------------------------------------------------------------------
# The matched references


def resolve(values: dict) -> tuple[TrainConfig, GPTConfig] | None:
    """The training and model config that flat config `values` build (the vocabulary size a
    placeholder), or None if the values are invalid."""
    try:
        train_cfg, model = build_configs(values)
        return train_cfg, GPTConfig(block_size=train_cfg.block_size, **{"vocab_size": 1, **model})
    except (ConfigError, ValueError, TypeError):
        return None


def model_config(values: dict) -> GPTConfig | None:
    """The model config of `resolve(values)`, or None if the values are invalid."""
    resolved = resolve(values)
    return None if resolved is None else resolved[1]


def plain_model(values: dict, n_layer: int) -> dict:
    """`values` with looping off and `n_layer` unique blocks."""
    out = {k: v for k, v in values.items() if k not in PLAIN_DROPPED_KEYS}
    out["n_layer"] = n_layer
    return out


def parameter_matched(values: dict, config: GPTConfig) -> dict:
    """The plain model with the looped model's unique blocks, run once each."""
    return plain_model(values, config.n_layer)


def depth_matched(values: dict, config: GPTConfig) -> dict:
    """The plain model with as many unique blocks as the looped model applies per pass."""
    return plain_model(values, effective_depth(config))


REFERENCES = {"param": parameter_matched, "depth": depth_matched}


def _canonical(values: dict) -> str | None:
    """The resolved config as a string, with what cannot matter for a plain model removed; None
    if the values are invalid. Two variants with the same canonical form are the same run."""
    configs = resolve(values)
    if configs is None:
        return None
    train_cfg, config = configs
    resolved, tdict = config.to_dict(), train_cfg.to_dict()
    if not is_looped(config):
        defaults = all_keys()
        for k in PLAIN_DROPPED_KEYS:
            if k in resolved:
                resolved[k] = defaults[k][1]
        tdict["eval_loops"] = defaults["eval_loops"][1]
    return json.dumps({"train": tdict, "model": resolved}, sort_keys=True)


def depth_protocol_variants(section: Section) -> list:
    """The section's variants plus, for its `cross_model_depth` request, the named variant
    trained at every count r of `train_loops` (`<variant>_r<r>`, max_loops = r). A variant of
    the section with the same resolved config stands for r instead of a new one. Each variant of
    the protocol gets its count (`depth_protocol_count`) and every count as `extra_loops`."""
    variants = [Variant(v.name, dict(v.values)) for v in section.variants]
    request = section.cross_model_depth
    if not request:
        return variants
    by_canonical = {}
    for v in variants:
        key = _canonical({**section.base, **v.values})
        if key is not None:
            by_canonical.setdefault(key, v)
    named = next(v for v in variants if v.name == request["variant"])
    taken = {v.name for v in variants} | {safe_name(v.name) for v in variants}
    for r in request["train_loops"]:
        values = {**named.values, "max_loops": r}
        key = _canonical({**section.base, **values})
        # An invalid config has no canonical form: it gets its own variant (a planned failure).
        match = by_canonical.get(key) if key is not None else None
        if match is None:
            match = Variant(_free_name(f"{named.name}_r{r}", taken), values)
            variants.append(match)
        match.depth_protocol_count = r
        match.extra_loops = list(request["train_loops"])
    return variants


def _free_name(name: str, taken: set) -> str:
    """`name`, suffixed until neither it nor its directory name is taken; then taken."""
    while name in taken or safe_name(name) in taken:
        name += "_x"
    taken.update((name, safe_name(name)))
    return name


def add_baselines(section: Section) -> list:
    """The section's variants (with those of its `cross_model_depth` request, see
    `depth_protocol_variants`) plus, for each looped one, its REFERENCES (reusing an existing
    variant with the same resolved config). A variant the protocol added is compared with the
    protocol's other counts, not with plain references, so it gets none (they would cost runs of
    up to max(train_loops) unique blocks)."""
    variants = depth_protocol_variants(section)
    if not section.baselines:
        return variants
    written = {v.name for v in section.variants}
    by_canonical = {}
    for v in variants:
        key = _canonical({**section.base, **v.values})
        if key is not None:
            by_canonical.setdefault(key, v)
    names = {v.name for v in variants}
    for v in list(variants):
        full = {**section.base, **v.values}
        config = model_config(full)
        if config is None or not is_looped(config) or v.name not in written:
            continue
        for kind, reference in REFERENCES.items():
            ref_values = reference(full, config)
            key = _canonical(ref_values)
            ref = by_canonical.get(key)
            if ref is None:
                ref = _new_baseline(section, ref_values, names)
                variants.append(ref)
                by_canonical[key] = ref
            v.references[kind] = ref.name
            if v.name not in ref.baseline_for:
                ref.baseline_for.append(v.name)
    return variants


def _new_baseline(section: Section, ref_values: dict, names: set) -> Variant:
    """A reference variant named plain_L<n_layer>, its overrides relative to the section base."""
    overrides = {k: val for k, val in ref_values.items()
                 if k not in section.base or section.base[k] != val}
    defaults = all_keys()
    for k in section.base:
        if k not in ref_values:
            # A looping key the section base sets: the reference has the config default.
            overrides[k] = defaults[k][1]
    name = f"plain_L{ref_values['n_layer']}"
    while name in names:
        name += "_ref"
    names.add(name)
    return Variant(name, overrides, role="baseline")


# ----------------------------------------------------------------------------------------------
# Budgets and run identity


def _data_vocab_size(cfg: TrainConfig) -> int:
    """The vocabulary size the run will use: the task's, or meta.json's for token data."""
    if cfg.is_task:
        return task_from_config(cfg.dataset, cfg.to_dict()).vocab_size
    meta_path = cfg.resolved_data_dir() / "meta.json"
    try:
        return int(json.loads(meta_path.read_text())["vocab_size"])
    except (OSError, ValueError, KeyError) as e:
        raise ExperimentError(
            f"cannot read the vocabulary size from {meta_path} ({e}); prepare the data first, "
            f"e.g. `blockloop prepare {cfg.dataset}`"
        ) from None


def _cost_per_iter(cfg: TrainConfig, model_overrides: dict):
    """A function `iters -> expected training FLOPs per iteration` over a run of that many
    iterations, as train.py counts them: each step at its loop schedule's counts
    (`blockloop.looping.schedule_steps`); a sampled count's cost is taken at its mean, the
    scheduled count (the samplers' mean up to their cap, `blockloop.looping.sample_num_loops`).
    Raises ExperimentError where the data's vocabulary size is unknown."""
    kwargs = dict(model_overrides)
    kwargs.setdefault("vocab_size", _data_vocab_size(cfg))
    config = GPTConfig(block_size=cfg.block_size, **kwargs)
    # On the meta device no memory is allocated, so sizing a large model costs nothing.
    with torch.device("meta"):
        model = GPT(config)
    tokens = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size

    def per_iter(iters: int) -> float:
        steps = schedule_steps(config, iters) or [(trained_counts(config), 1)]
        total = sum(n * model.flops_per_token(counts) for counts, n in steps)
        return total / sum(n for _, n in steps) * tokens

    return per_iter


def _iters_for_flops(budget: float, per_iter) -> int:
    """A number of iterations whose expected training FLOPs come close to `budget`: the best of
    up to 20 fixed-point steps n <- budget / per_iter(n) (not an exhaustive search).

    The cost of an iteration depends on the run's length only through the loop schedule (its
    switch and ramp steps scale with it), so the steps settle quickly (at once for a constant
    schedule); the shipped schedules experiment plans within 0.01% of its budget (tested to
    1%)."""
    tried, n = {}, 1
    while n not in tried and len(tried) < 20:
        tried[n] = per_iter(n)
        n = max(1, round(budget / tried[n]))
    return min(tried, key=lambda k: (abs(k * tried[k] - budget), k))


def _budget_iters(section: Section, full: dict) -> tuple[int | None, float | None, str | None]:
    """(iterations, expected training FLOPs per iteration over those iterations, planning
    error) of a variant's values."""
    iters, fpi = None, None
    try:
        train_cfg, model_overrides = build_configs({**full, "max_iters": 1, "lr_decay_iters": 1})
        iters = section.budget.get("iters")
        try:
            per_iter = _cost_per_iter(train_cfg, model_overrides)
        except ExperimentError:
            if "flops" in section.budget:
                raise
            return iters, None, None
        if iters is None:
            iters = _iters_for_flops(section.budget["flops"], per_iter)
        fpi = per_iter(iters)
    except (ConfigError, ExperimentError, ValueError) as e:
        return iters, fpi, f"{type(e).__name__}: {e}"
    return iters, fpi, None


def _spec_hash(values: dict, evaluation: dict) -> str:
    """Identity of a run's result: what it trains and how it is evaluated (not where it lives)."""
    relevant = {k: v for k, v in values.items() if k not in ("out_dir", "threads", "progress")}
    blob = json.dumps({"values": relevant, "evaluation": evaluation}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


# ----------------------------------------------------------------------------------------------
# The plan


def plan_experiment(exp: Experiment, out_dir: Path, threads: int = 1,
                    extra_seeds: dict | None = None) -> tuple[list, dict]:
    """All runs of the experiment, and a JSON-able description of the plan for the report.

    extra_seeds: section name -> variant name -> seeds run besides the section's `seeds` (added
    by adaptive seeding)."""
    runs, sections_info = [], []
    extra_seeds = extra_seeds or {}
    for section in exp.sections:
        sec_info = {
            "name": section.name, "description": section.description,
            "budget": section.budget, "seeds": section.seeds, "evaluation": section.evaluation,
            "base": section.base, "variants": [], "solve_threshold": section.solve_threshold,
            "adaptive_seeds": section.adaptive_seeds,
        }
        extra = extra_seeds.get(section.name, {})
        variants = add_baselines(section)
        for v in variants:
            seeds = section.seeds + extra.get(v.name, [])
            v_info, v_runs = _plan_variant(exp, section, v, seeds, Path(out_dir), threads)
            sec_info["variants"].append(v_info)
            runs += v_runs
        if section.cross_model_depth:
            sec_info["cross_model_depth"] = {
                **section.cross_model_depth,
                "trained": [{"train_loops": v.depth_protocol_count, "variant": v.name}
                            for v in sorted(variants, key=lambda v: v.depth_protocol_count or 0)
                            if v.depth_protocol_count is not None],
            }
        sections_info.append(sec_info)
    info = {
        "name": exp.name, "description": exp.description, "file": exp.path,
        "sections": sections_info,
        # The report matches results.jsonl records against these, so a stale record (same run
        # id, different config) is never reported as the current result.
        "runs": [{"run_id": r.run_id, "section": r.section, "variant": r.variant,
                  "seed": r.seed, "spec_hash": r.spec_hash} for r in runs],
    }
    return runs, info


def _plan_variant(exp: Experiment, section: Section, v: Variant, seeds: list, out_dir: Path,
                  threads: int) -> tuple[dict, list]:
    """The plan's description of variant `v` and its runs, one per seed of `seeds`."""
    full = {**section.base, **v.values}
    config = model_config(full)
    iters, fpi, error = _budget_iters(section, full)
    evaluation = _evaluation(section, v)
    v_info = {
        "name": v.name, "role": v.role, "overrides": v.values, "references": v.references,
        "baseline_for": v.baseline_for, "looped": config is not None and is_looped(config),
        "error": error, "iters": iters, "flops_per_iter": fpi, "seeds": seeds,
    }
    runs_root = out_dir / RUNS_DIR
    runs = []
    for seed in seeds:
        run_id = f"{safe_name(section.name)}/{safe_name(v.name)}-s{seed}"
        run_dir = runs_root / run_id
        if not _inside(run_dir, runs_root):
            raise ExperimentError(f"run directory {run_dir} would leave {runs_root}")
        values = {
            **full, **RUNNER_FORCED,
            "out_dir": str(run_dir), "seed": seed,
            "max_iters": iters or 1, "lr_decay_iters": iters or 1,
        }
        values.setdefault("threads", threads)
        values.setdefault("wandb_run_name", f"{exp.name}/{run_id}")
        runs.append(RunPlan(
            run_id=run_id, section=section.name, variant=v.name, seed=seed, role=v.role,
            run_dir=run_dir, values=values, evaluation=evaluation, iters=iters,
            flops_per_iter=fpi, spec_hash=_spec_hash(values, evaluation), error=error,
        ))
    return v_info, runs


def _evaluation(section: Section, v: Variant) -> dict:
    """The section's evaluation, with the variant's `extra_loops` among the test-time counts
    (`looping.scaling_loop_counts` drops those the model cannot run)."""
    if not v.extra_loops:
        return section.evaluation
    counts = sorted(set(section.evaluation["test_loops"]) | set(v.extra_loops))
    return {**section.evaluation, "test_loops": counts}
