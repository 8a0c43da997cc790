"""Experiment files: what an experiment asks for, read and checked before anything runs.

Like config files they are `key = value` lines of Python literals, parsed with `ast` and never
executed, by the same parser (`blockloop.config.parse_assignments`); dicts are allowed here
because a variant is a dict of overrides, and upper-case names are constants for reuse within
the file (`LOOP = {"max_loops": 3}`, then `{"name": "a", **LOOP}`). The format
(`blockloop experiment --help` prints it too, from FORMAT_HELP)::

    name = "looping"                    # required; default output dir experiments/<name>/
    description = "..."                 # optional, shown in the report
    base_config = "train_x.py"          # optional config file (relative to this file)
    base = {"n_embd": 64, ...}          # keys as in `blockloop train --help`
    variants = [{"name": "plain_L4", "n_layer": 4},
                {"name": "loop", "n_layer": 2, "loop_center_idx": 1, "max_loops": 3}]
    seeds = [1, 2]
    budget = {"iters": 500}             # or {"flops": 2e12}: training FLOPs per run
    baselines = True                    # add parameter- and depth-matched plain models
    evaluation = {"test_loops": [1, 2, 4, 8, 16], ...}   # post-training evaluation
    solve_threshold = 0.95              # tasks: a seed solves it at this final accuracy
    adaptive_seeds = {"target_width": 0.02, "max_seeds": 10, "max_runs": 20}   # optional
    cross_model_depth = {"variant": "loop", "train_loops": [1, 2, 3, 4, 6]}   # optional

`cross_model_depth` asks for the cross-model test-time depth protocol: the named looped variant
is trained once per count in `train_loops` (variants `<variant>_r<r>`, its `max_loops` set to r;
a variant of the section with that very config is reused) and every run is evaluated at every
count, so the report can say whether a model trained at r and run at r' > r beats the model
trained at r' (`blockloop.experiment.depth_protocol`). Written at the top level it applies to
every section; `cross_model_depth = None` in a section switches it off there.

Several independent comparisons go in one file as `sections = [{"name": ..., "base": ...,
"variants": ..., ...}, ...]`; top-level keys other than `name`/`description` are defaults for
every section (`base` dicts merge, the section's keys winning). Every mistake is an
`ExperimentError` naming the file, the key and what is allowed.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from blockloop.config import (
    all_keys,
    build_configs,
    parse_assignments,
    read_config_file,
)
from blockloop.errors import ConfigError, ExperimentError
from blockloop.experiment.files import safe_name
from blockloop.looping import is_looped
from blockloop.model import GPTConfig

# Keys every run gets from the runner. Written in an experiment file they would be silently
# ignored, so they are refused there; coming from a base_config file (e.g. nanoGPT-style configs
# that set out_dir) they are simply replaced.
RUNNER_KEYS = ("out_dir", "seed", "max_iters", "lr_decay_iters")
SECTION_KEYS = (
    "name", "description", "base_config", "base", "variants", "seeds", "budget", "baselines",
    "evaluation", "solve_threshold", "adaptive_seeds", "cross_model_depth",
)
TOP_KEYS = SECTION_KEYS + ("sections",)
DEFAULT_SECTION = "main"
# The keys of `cross_model_depth`: the looped variant to retrain, and its trained counts.
CROSS_MODEL_KEYS = ("variant", "train_loops")
EVALUATION_DEFAULTS = {
    # Test-time iteration counts for looped variants, added to those every loop-scaling curve
    # gets (blockloop.looping.scaling_loop_counts: 1 .. twice the trained count, 1, 2, 4, 8, 16),
    # so the plot always shows the trained point and what lies beyond it.
    "test_loops": [1, 2, 4, 8, 16],
    # Automatic-exit thresholds swept at test time (relative change of the state, see looping).
    "exit_thresholds": [0.3, 0.1, 0.03, 0.01, 0.003, 0.001],
    # The sweep may use up to this many times the trained iteration count.
    "exit_max_loops_factor": 2,
    # "token": each token stops on its own, so every loss of the sweep is causal (no later
    # token chose the depth of an earlier one); "sequence": whole sequences stop.
    "exit_granularity": "token",
    "samples": 2,  # generated samples per run (token data only)
    "sample_tokens": 200,
    "sample_temperature": 0.8,
    "hops": [],  # synthetic tasks: hop counts asked at test time; empty means 1 .. 2 x trained
}
# A seed "solves" a synthetic task when its final accuracy reaches this (report only: changing
# it reruns nothing). Solved-or-not outcomes are reported as solve rates, not means.
DEFAULT_SOLVE_THRESHOLD = 0.95
# adaptive_seeds: keys and what each must be.
ADAPTIVE_KEYS = {
    "target_width": "the widest acceptable 95% interval of a paired difference, in the "
                    "section metric's units (a number > 0)",
    "max_seeds": "the most seeds any variant gets (an integer >= 2 and >= the number of seeds)",
    "max_runs": "the most runs adaptive seeding may add to the section (an integer >= 0)",
}

FORMAT_HELP = """experiment file format (Python literals, parsed, never executed):
  name = "looping"                       required; output goes to experiments/<name>/
  description = "..."                    optional
  base_config = "train_x.py"             optional config file (relative to this file)
  base = {"n_layer": 4, "n_embd": 64}    config keys shared by all variants
  variants = [{"name": "plain", "n_layer": 4},
              {"name": "loop", "n_layer": 2, "loop_center_idx": 1, "max_loops": 3}]
  seeds = [1, 2]
  budget = {"iters": 500}                or {"flops": 2e12} (training FLOPs per run)
  baselines = True                       add parameter- and depth-matched plain models
  evaluation = {"test_loops": [1, 2, 4, 8, 16], "exit_thresholds": [0.1, 0.01],
                "exit_max_loops_factor": 2, "samples": 2, "sample_tokens": 200,
                "sample_temperature": 0.8, "hops": []}
  solve_threshold = 0.95                 tasks: a seed counts as solved at this accuracy
  adaptive_seeds = {"target_width": 0.02, "max_seeds": 10, "max_runs": 20}
                                         optional: after the seeds, add seeds (next integers)
                                         to every comparison whose 95% interval is wider than
                                         target_width, up to max_seeds per variant and
                                         max_runs added runs per section
  cross_model_depth = {"variant": "loop", "train_loops": [1, 2, 3, 4, 6]}
                                         train the looped variant once per count (variants
                                         loop_r1, loop_r2, ...: max_loops = r) and evaluate
                                         each at every count: does a model run beyond its
                                         trained count beat the model trained at that count?
  sections = [{"name": "a", ...}, ...]   several comparisons in one file; top-level keys
                                         are defaults for every section
  LOOP = {"max_loops": 3}                upper-case names are constants: {"name": "a", **LOOP}
The runner sets out_dir, seed, max_iters and lr_decay_iters for every run."""


@dataclass
class Variant:
    """One variant of a section: its name and its own config overrides."""

    name: str
    values: dict  # the variant's own overrides, as written (or derived, for a baseline)
    role: str = "variant"  # "variant" or "baseline" (added by the runner)
    references: dict = field(default_factory=dict)  # looped variants: {"param": ..., "depth": ...}
    baseline_for: list = field(default_factory=list)
    # The cross-model depth protocol: the trained count this variant stands for, and the
    # test-time counts its evaluation adds (every count of the protocol).
    depth_protocol_count: int | None = None
    extra_loops: list = field(default_factory=list)


@dataclass
class Section:
    """One comparison: variants over a shared base config, seeds, budget and evaluation."""

    name: str
    description: str
    base: dict
    variants: list
    seeds: list
    budget: dict
    baselines: bool
    evaluation: dict
    solve_threshold: float = DEFAULT_SOLVE_THRESHOLD
    adaptive_seeds: dict | None = None  # {"target_width", "max_seeds", "max_runs"} or None
    # {"variant": name, "train_loops": sorted distinct counts}, or None (see CROSS_MODEL_KEYS)
    cross_model_depth: dict | None = None


@dataclass
class Experiment:
    """A parsed experiment file."""

    name: str
    description: str
    path: str
    sections: list


def read_experiment_file(path: str | os.PathLike) -> Experiment:
    """Parse and validate an experiment file (see the module docstring for the format)."""
    path = Path(path)
    values = _read_assignments(path)
    where = f"experiment file {path}"
    if "name" not in values:
        raise ExperimentError(f"{where}: 'name' is missing, e.g. name = \"looping\"")
    name = _expect(where, "name", values["name"], str, "a string")
    if not name:
        raise ExperimentError(f"{where}: 'name' is empty")
    description = _expect(where, "description", values.get("description", ""), str, "a string")
    shared = {k: v for k, v in values.items() if k not in ("name", "description", "sections")}
    if "sections" not in values:
        sections = [_build_section(shared, where, path)]
    else:
        sections = _build_sections(values["sections"], shared, where, path)
    return Experiment(name=name, description=description, path=str(path), sections=sections)


def _read_assignments(path: Path) -> dict:
    try:
        assignments = parse_assignments(path, kind="experiment", constants=True)
    except ConfigError as e:
        raise ExperimentError(str(e)) from None
    values = {}
    for key, value, where in assignments:
        if key not in TOP_KEYS:
            raise ExperimentError(f"{where}: unknown key '{key}'{_suggest(key, TOP_KEYS)}")
        values[key] = value
    return values


def _build_sections(raw_sections, shared: dict, where: str, path: Path) -> list:
    _expect(where, "sections", raw_sections, list, "a list of dicts")
    if not raw_sections:
        raise ExperimentError(f"{where}: 'sections' is empty")
    sections = []
    for i, raw in enumerate(raw_sections):
        _expect(where, f"sections[{i}]", raw, dict, "a dict")
        for key in raw:
            if key not in SECTION_KEYS:
                raise ExperimentError(
                    f"{where}, sections[{i}]: unknown key '{key}'{_suggest(key, SECTION_KEYS)}"
                )
        if "name" not in raw:
            raise ExperimentError(f"{where}, sections[{i}]: needs a 'name'")
        merged = {**shared, **raw}
        merged["base"] = {**shared.get("base", {}), **raw.get("base", {})}
        sections.append(_build_section(merged, where, path))
    names = [safe_name(s.name) for s in sections]
    if len(set(names)) != len(names):
        raise ExperimentError(f"{where}: section names must be distinct as directory names")
    return sections


def _build_section(raw: dict, where: str, path: Path) -> Section:
    name = _expect(where, "name", raw.get("name", DEFAULT_SECTION), str, "a string")
    where = f"{where}, section '{name}'"
    description = _expect(where, "description", raw.get("description", ""), str, "a string")
    base = {}
    if "base_config" in raw:
        base.update(_read_base_config(where, raw["base_config"], path))
    base.update(_check_base(where, "base", _expect(where, "base", raw.get("base", {}), dict, "a dict")))
    variants = _build_variants(where, raw)
    if "seeds" not in raw:
        raise ExperimentError(f"{where}: 'seeds' is missing, e.g. seeds = [1, 2]")
    seeds = _int_list(where, "seeds", raw["seeds"], 0)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ExperimentError(f"{where}: 'seeds' must be a non-empty list of distinct integers")
    if "budget" not in raw:
        raise ExperimentError(f"{where}: 'budget' is missing, e.g. budget = {{\"iters\": 500}}")
    budget = _check_budget(where, raw["budget"])
    baselines = _expect(where, "baselines", raw.get("baselines", True), bool, "True or False")
    evaluation = _check_evaluation(where, raw.get("evaluation", {}))
    threshold = raw.get("solve_threshold", DEFAULT_SOLVE_THRESHOLD)
    if not (_is_number(threshold) and 0 < threshold <= 1):
        raise ExperimentError(f"{where}: 'solve_threshold' must be an accuracy in (0, 1], "
                              f"got {threshold!r}")
    adaptive = _check_adaptive(where, raw.get("adaptive_seeds"), len(seeds))
    depth = None
    if raw.get("cross_model_depth") is not None:
        depth = _check_cross_model_depth(where, raw["cross_model_depth"], base, variants)
    return Section(name, description, base, variants, seeds, budget, baselines, evaluation,
                   float(threshold), adaptive, depth)


def _check_adaptive(where: str, adaptive, n_seeds: int) -> dict | None:
    """The validated `adaptive_seeds` dict of a section (None: off)."""
    if adaptive is None:
        return None
    _expect(where, "adaptive_seeds", adaptive, dict,
            'a dict: {"target_width": 0.02, "max_seeds": 10, "max_runs": 20}')
    for key in adaptive:
        if key not in ADAPTIVE_KEYS:
            raise ExperimentError(f"{where}: unknown adaptive_seeds key '{key}'"
                                  f"{_suggest(key, ADAPTIVE_KEYS)}")
    for key, what in ADAPTIVE_KEYS.items():
        if key not in adaptive:
            raise ExperimentError(f"{where}: adaptive_seeds needs '{key}': {what}")
    width, max_seeds, max_runs = (adaptive[k] for k in ADAPTIVE_KEYS)
    if not (_is_number(width) and width > 0):
        raise ExperimentError(f"{where}: adaptive_seeds 'target_width' must be a number > 0 "
                              f"(in the section metric's units), got {width!r}")
    if not _is_int(max_seeds, max(n_seeds, 2)):
        raise ExperimentError(f"{where}: adaptive_seeds 'max_seeds' must be an integer >= "
                              f"{max(n_seeds, 2)} (at least 2, and at least the section's {n_seeds} seeds), "
                              f"got {max_seeds!r}")
    if not _is_int(max_runs, 0):
        raise ExperimentError(f"{where}: adaptive_seeds 'max_runs' must be an integer >= 0, "
                              f"got {max_runs!r}")
    return {"target_width": float(width), "max_seeds": max_seeds, "max_runs": max_runs}


def _build_variants(where: str, raw: dict) -> list:
    if "variants" not in raw:
        raise ExperimentError(f"{where}: 'variants' is missing: a list of dicts with a 'name'")
    raw_variants = _expect(where, "variants", raw["variants"], list, "a list of dicts")
    if not raw_variants:
        raise ExperimentError(f"{where}: 'variants' is empty")
    variants, seen = [], {}
    for i, v in enumerate(raw_variants):
        _expect(where, f"variants[{i}]", v, dict, "a dict with a 'name'")
        vname = v.get("name")
        if not isinstance(vname, str) or not vname:
            raise ExperimentError(f"{where}: variants[{i}] needs a non-empty string 'name'")
        overrides = {k: val for k, val in v.items() if k != "name"}
        _check_base(where, f"variant '{vname}'", overrides)
        component = safe_name(vname)
        if component in seen:
            raise ExperimentError(
                f"{where}: variants '{seen[component]}' and '{vname}' map to the same run "
                f"directory name '{component}'; rename one"
            )
        seen[component] = vname
        variants.append(Variant(name=vname, values=overrides))
    return variants


def _suggest(key: str, allowed) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{hint} (allowed: {', '.join(allowed)})"


def _expect(where: str, key: str, value, kind, what: str):
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if not ok:
        raise ExperimentError(f"{where}: '{key}' must be {what}, got {value!r}")
    return value


def _is_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_list(where: str, key: str, value, minimum: int) -> list:
    if not isinstance(value, list) or not all(_is_int(v, minimum) for v in value):
        raise ExperimentError(f"{where}: '{key}' must be a list of integers >= {minimum}, got {value!r}")
    return value


def _check_budget(where: str, budget) -> dict:
    _expect(where, "budget", budget, dict, 'a dict: {"iters": N} or {"flops": F}')
    if len(budget) != 1 or next(iter(budget)) not in ("iters", "flops"):
        raise ExperimentError(
            f"{where}: 'budget' must hold exactly one of 'iters' (iterations per run) or 'flops' "
            f"(training FLOPs per run), got {budget!r}"
        )
    kind, amount = next(iter(budget.items()))
    if kind == "iters" and not _is_int(amount, 1):
        raise ExperimentError(f"{where}: budget 'iters' must be an integer >= 1, got {amount!r}")
    if kind == "flops" and not (_is_number(amount) and amount > 0):
        raise ExperimentError(f"{where}: budget 'flops' must be a positive number, got {amount!r}")
    return {kind: amount}


def _check_evaluation(where: str, evaluation) -> dict:
    _expect(where, "evaluation", evaluation, dict, "a dict")
    out = dict(EVALUATION_DEFAULTS)
    for key, value in evaluation.items():
        if key not in EVALUATION_DEFAULTS:
            raise ExperimentError(
                f"{where}: unknown evaluation key '{key}'{_suggest(key, EVALUATION_DEFAULTS)}"
            )
        name = f"evaluation.{key}"
        if key == "exit_thresholds":
            if not (isinstance(value, list) and all(_is_number(v) and v >= 0 for v in value)):
                raise ExperimentError(f"{where}: '{name}' must be a list of numbers >= 0")
        elif key in ("test_loops", "hops"):
            _int_list(where, name, value, 1)
        elif key == "exit_granularity":
            if value not in ("token", "sequence"):
                raise ExperimentError(f"{where}: '{name}' must be 'token' or 'sequence'")
        elif key == "sample_temperature":
            if not (_is_number(value) and value >= 0):
                raise ExperimentError(f"{where}: '{name}' must be a number >= 0")
            value = float(value)
        else:
            minimum = 1 if key == "exit_max_loops_factor" else 0
            if not _is_int(value, minimum):
                raise ExperimentError(f"{where}: '{name}' must be an integer >= {minimum}")
        out[key] = value
    return out


def _check_cross_model_depth(where: str, value, base: dict, variants: list) -> dict:
    """The section's `cross_model_depth` request, checked against its variants."""
    key = "cross_model_depth"
    _expect(where, key, value, dict,
            'a dict: {"variant": "<looped variant>", "train_loops": [1, 2, 3, 4, 6]}')
    for k in value:
        if k not in CROSS_MODEL_KEYS:
            raise ExperimentError(f"{where}: unknown key '{k}' in '{key}'"
                                  f"{_suggest(k, CROSS_MODEL_KEYS)}")
    names = [v.name for v in variants]
    name = value.get("variant")
    if name not in names:
        raise ExperimentError(f"{where}: '{key}.variant' must name a variant of the section "
                              f"({', '.join(names)}), got {name!r}")
    if "train_loops" not in value:
        raise ExperimentError(f"{where}: '{key}.train_loops' is missing, e.g. [1, 2, 3, 4, 6]")
    counts = _int_list(where, f"{key}.train_loops", value["train_loops"], 1)
    if len(set(counts)) < 2 or len(set(counts)) != len(counts):
        raise ExperimentError(f"{where}: '{key}.train_loops' must hold at least two distinct "
                              f"iteration counts, got {counts!r}")
    full = {**base, **next(v for v in variants if v.name == name).values}
    if full.get("loop_counts"):
        # One count per group would leave open which group's count r sets.
        raise ExperimentError(f"{where}: '{key}': variant '{name}' sets 'loop_counts'; the "
                              f"protocol sets the trained count through 'max_loops', so give "
                              f"the variant 'max_loops' instead")
    if _looped(full) is False:
        raise ExperimentError(f"{where}: '{key}': variant '{name}' is not looped (give it a "
                              f"looped range, e.g. 'loop_center_idx': 0)")
    return {"variant": name, "train_loops": sorted(counts)}


def _looped(values: dict) -> bool | None:
    """Whether flat config `values` build a looped model; None if they are invalid (the planner
    then records every run of the variant as a failure with its error)."""
    try:
        train_cfg, model = build_configs(values)
        config = GPTConfig(block_size=train_cfg.block_size, **{"vocab_size": 1, **model})
    except (ConfigError, ValueError, TypeError):
        return None
    return is_looped(config)


def _check_base(where: str, key: str, values: dict) -> dict:
    known = all_keys()
    for k in values:
        if k not in known:
            close = difflib.get_close_matches(k, list(known), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "; see 'blockloop train --help'"
            raise ExperimentError(f"{where}: unknown config key '{k}' in '{key}'{hint}")
        if k in RUNNER_KEYS:
            raise ExperimentError(
                f"{where}: '{k}' in '{key}' is set by the experiment runner for every run "
                f"(from the output directory, 'seeds' and 'budget'); remove it"
            )
    return values


def _read_base_config(where: str, ref, experiment_path: Path) -> dict:
    _expect(where, "base_config", ref, str, "a path to a config file")
    candidate = experiment_path.parent / ref
    path = candidate if candidate.is_file() else Path(ref)
    try:
        values = read_config_file(path)
    except ConfigError as e:
        raise ExperimentError(f"{where}: base_config: {e}") from None
    # The config file's own out_dir, seed, ... are replaced per run (see RUNNER_KEYS).
    return {k: v for k, v in values.items() if k not in RUNNER_KEYS}
