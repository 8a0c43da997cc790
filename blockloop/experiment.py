"""`blockloop experiment FILE`: train every variant x seed under one budget, then report.

What this module holds, in the order an experiment goes through it:

1. **Experiment files** (`read_experiment_file`). Like config files they are `key = value` lines
   of Python literals, parsed with `ast` and never executed; dicts are allowed here because a
   variant is a dict of overrides. The format (`blockloop experiment --help` prints it too)::

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

   Several independent comparisons go in one file as `sections = [{"name": ..., "base": ...,
   "variants": ..., ...}, ...]`; top-level keys other than `name`/`description` are defaults for
   every section (`base` dicts merge, the section's keys winning). Upper-case names are
   constants for reuse within the file (`LOOP = {"max_loops": 3}`, then `{"name": "a", **LOOP}`).
   Every mistake is an `ExperimentError` naming the file, the key and what is allowed.

2. **Planning** (`plan_experiment`). Each variant is resolved to a validated training config;
   keys the runner owns (`out_dir`, `seed`, `max_iters`, `lr_decay_iters`) are set per run, so
   every run of a seed sees the same training batches and every run sees the same evaluation
   batches. A FLOPs budget becomes iterations per variant: budget / (training FLOPs per token at
   the mean iteration count x tokens per iteration). For a looped variant the runner adds its two
   natural references, unless a variant with the same resolved config already exists: the
   *parameter-matched* plain model (same unique blocks, no loop) and the *depth-matched* one
   (as many unique blocks as the effective depth). A variant whose config is invalid becomes a
   failed run with its error; the others still run.

3. **Execution** (`run_experiment`). Every run is its own `python` process (so a crash, a leak or
   a thread setting cannot touch the others), up to `--jobs` at a time, each with
   `cpus // jobs` torch threads: on a small CPU two single-thread runs side by side finish sooner
   than one two-thread run after another. The parent tails each run's `metrics.jsonl` for
   progress (run i of n, iteration, loss, ETA). A run that ends without a result file, or with an
   error, is recorded as failed with its error, and the others go on.

4. **Post-training evaluation** (`post_evaluate`, in the run's process): test-time loop scaling,
   an automatic-exit threshold sweep, generated samples (token data) and, for synthetic tasks,
   accuracy against test-time iterations and against the number of hops asked, with the
   trivial-strategy floors beside them.

5. **Results**: one JSON line per finished run in `results.jsonl` (the last line for a run wins),
   then `blockloop.report` writes `report/report.md` and its figures. A run whose result line
   exists with the same resolved config is skipped on the next invocation, so an interrupted
   experiment resumes where it stopped (unfinished runs restart from scratch; `--force` reruns
   everything).

Layout of the output directory::

    experiment.json      the plan and this invocation's timing (read by the report)
    results.jsonl        one record per run
    runs/<section>/<variant>-s<seed>/   checkpoints, metrics.jsonl, log.txt, result.json
    report/report.md     tables, figures (PNG) and how to read them

Names from experiment files become single path components (`safe_name`), and every run directory
is checked to lie inside the output directory, so no name can write elsewhere.
"""

from __future__ import annotations

import argparse
import ast
import copy
import difflib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from blockloop.errors import ExperimentError
from blockloop.checkpoint import load_checkpoint
from blockloop.config import (
    ConfigError,
    TrainConfig,
    _literal,
    all_keys,
    build_configs,
    read_config_file,
)
from blockloop.model import GPT, LOOP_KEYS, GPTConfig
from blockloop.sampling import generate
from blockloop.tasks import baseline_floors, task_from_config
from blockloop.tokenizers import tokenizer_from_meta
from blockloop.checkpoint import LAST_CKPT
from blockloop.evaluation import evaluate
from blockloop.records import read_jsonl
from blockloop.runtime import autocast_context, resolve_device, resolve_dtype
from blockloop.train import TrainingData, train

RESULTS_FILE = "results.jsonl"
PLAN_FILE = "experiment.json"
RUN_RESULT_FILE = "result.json"
RUN_SPEC_FILE = "spec.json"
RUN_LOG_FILE = "log.txt"
REPORT_DIR = "report"
RUNS_DIR = "runs"
# Keys every run gets from the runner. Written in an experiment file they would be silently
# ignored, so they are refused there; coming from a base_config file (e.g. nanoGPT-style configs
# that set out_dir) they are simply replaced.
RUNNER_KEYS = ("out_dir", "seed", "max_iters", "lr_decay_iters")
# Also set by the runner, but harmless to mention: post-training evaluation needs the final
# model in last.pt, and a child's progress bar would only clutter its log file.
RUNNER_FORCED = {"always_save_checkpoint": True, "progress": False}
SECTION_KEYS = (
    "name", "description", "base_config", "base", "variants", "seeds", "budget", "baselines",
    "evaluation",
)
TOP_KEYS = SECTION_KEYS + ("sections",)
DEFAULT_SECTION = "main"
EVALUATION_DEFAULTS = {
    # Test-time iteration counts for looped variants; every count from 1 to twice the trained
    # count is added, so the plot always shows the trained point and what lies beyond it.
    "test_loops": [1, 2, 4, 8, 16],
    # Automatic-exit thresholds swept at test time (relative change of the state, see looping).
    "exit_thresholds": [0.3, 0.1, 0.03, 0.01, 0.003, 0.001],
    # The sweep may use up to this many times the trained iteration count.
    "exit_max_loops_factor": 2,
    "samples": 2,  # generated samples per run (token data only)
    "sample_tokens": 200,
    "sample_temperature": 0.8,
    "hops": [],  # synthetic tasks: hop counts asked at test time; empty means 1 .. 2 x trained
}
# Identifies the sample-generation random stream, so samples are reproducible per run.
SAMPLE_SEED = 1234
_NAME_OK = re.compile(r"[^A-Za-z0-9._-]")


# ----------------------------------------------------------------------------------------------
# Experiment files


@dataclass
class Variant:
    name: str
    values: dict  # the variant's own overrides, as written (or derived, for a baseline)
    role: str = "variant"  # "variant" or "baseline" (added by the runner)
    references: dict = field(default_factory=dict)  # looped variants: {"param": ..., "depth": ...}
    baseline_for: list = field(default_factory=list)


@dataclass
class Section:
    name: str
    description: str
    base: dict
    variants: list
    seeds: list
    budget: dict
    baselines: bool
    evaluation: dict


@dataclass
class Experiment:
    name: str
    description: str
    path: str
    sections: list


def safe_name(name: str) -> str:
    """`name` as one harmless path component: other characters become '_', and a leading dot is
    prefixed so that '.', '..' and hidden names cannot occur."""
    cleaned = _NAME_OK.sub("_", name)
    if not cleaned or cleaned.startswith("."):
        cleaned = "_" + cleaned
    return cleaned


def _value(node, where: str, constants: dict):
    """A literal from an experiment file: numbers, strings, lists, dicts with string keys, and
    names of constants defined earlier in the file (also as `**NAME` inside a dict)."""
    if isinstance(node, ast.Name):
        if node.id not in constants:
            raise ExperimentError(
                f"{where}: unknown name '{node.id}'; only upper-case constants assigned earlier "
                f"in the file can be used (e.g. LOOP = {{...}})"
            )
        return copy.deepcopy(constants[node.id])
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if k is None:  # `**NAME`
                merged = _value(v, where, constants)
                if not isinstance(merged, dict):
                    raise ExperimentError(f"{where}: '**' needs a dict")
                out.update(merged)
                continue
            if not (isinstance(k, ast.Constant) and isinstance(k.value, str)):
                raise ExperimentError(f"{where}: dict keys must be strings")
            out[k.value] = _value(v, where, constants)
        return out
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e, where, constants) for e in node.elts]
    try:
        return _literal(node, where)
    except ConfigError as e:
        raise ExperimentError(str(e).replace("config files", "experiment files")) from None


def _parse_assignments(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ExperimentError(f"experiment file {path}: cannot be read: {e}") from None
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as e:
        raise ExperimentError(f"experiment file {path}, line {e.lineno}: syntax error: {e.msg}") from None
    values, constants = {}, {}
    for node in tree.body:
        where = f"experiment file {path}, line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise ExperimentError(f"{where}: expected 'key = value'")
        key = node.targets[0].id
        value = _value(node.value, where, constants)
        if key.isupper():
            constants[key] = value  # a reusable constant, not an experiment key
        elif key in TOP_KEYS:
            values[key] = value
        else:
            raise ExperimentError(f"{where}: unknown key '{key}'{_suggest(key, TOP_KEYS)}")
    return values


def _suggest(key: str, allowed) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{hint} (allowed: {', '.join(allowed)})"


def _expect(where: str, key: str, value, kind, what: str):
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if not ok:
        raise ExperimentError(f"{where}: '{key}' must be {what}, got {value!r}")
    return value


def _int_list(where: str, key: str, value, minimum: int) -> list:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value
    ):
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
    if kind == "iters" and not (isinstance(amount, int) and not isinstance(amount, bool) and amount >= 1):
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
        elif key == "sample_temperature":
            if not (_is_number(value) and value >= 0):
                raise ExperimentError(f"{where}: '{name}' must be a number >= 0")
            value = float(value)
        else:
            minimum = 1 if key == "exit_max_loops_factor" else 0
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
                raise ExperimentError(f"{where}: '{name}' must be an integer >= {minimum}")
        out[key] = value
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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


def _build_section(raw: dict, where: str, path: Path) -> Section:
    name = _expect(where, "name", raw.get("name", DEFAULT_SECTION), str, "a string")
    where = f"{where}, section '{name}'"
    description = _expect(where, "description", raw.get("description", ""), str, "a string")
    base = {}
    if "base_config" in raw:
        base.update(_read_base_config(where, raw["base_config"], path))
    base.update(_check_base(where, "base", _expect(where, "base", raw.get("base", {}), dict, "a dict")))
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
    return Section(name, description, base, variants, seeds, budget, baselines, evaluation)


def read_experiment_file(path: str | os.PathLike) -> Experiment:
    """Parse and validate an experiment file (see the module docstring for the format)."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file {path} not found")
    values = _parse_assignments(path)
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
        raw_sections = _expect(where, "sections", values["sections"], list, "a list of dicts")
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
    return Experiment(name=name, description=description, path=str(path), sections=sections)


# ----------------------------------------------------------------------------------------------
# Planning


@dataclass
class RunPlan:
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


def _looped(values: dict) -> bool:
    return values.get("loop_center_idx", -1) >= 0 and values.get("max_loops", 1) > 1


def _plain_reference(values: dict, n_layer: int) -> dict:
    """The variant's keys with looping off and `n_layer` unique blocks."""
    out = {k: v for k, v in values.items() if k not in LOOP_KEYS and k != "eval_loops"}
    out["n_layer"] = n_layer
    return out


def _effective_depth(values: dict) -> int:
    n_layer = values.get("n_layer", all_keys()["n_layer"][1])
    width = 2 * values.get("loop_radius", 0) + 1
    return n_layer + width * (values.get("max_loops", 1) - 1)


def _canonical(values: dict) -> str | None:
    """The resolved config as a string, with what cannot matter for a plain model removed; None
    if the values are invalid. Two variants with the same canonical form are the same run."""
    try:
        train_cfg, model = build_configs(values)
        resolved = GPTConfig(block_size=train_cfg.block_size,
                             **{"vocab_size": 1, **model}).to_dict()
    except (ConfigError, ValueError, TypeError):
        return None
    tdict = train_cfg.to_dict()
    if resolved["loop_center_idx"] < 0:
        defaults = GPTConfig(block_size=train_cfg.block_size, vocab_size=1).to_dict()
        for k in LOOP_KEYS:
            if k in resolved:
                resolved[k] = defaults[k]
        tdict["eval_loops"] = []
    return json.dumps({"train": tdict, "model": resolved}, sort_keys=True)


def add_baselines(section: Section) -> list:
    """The section's variants plus, for each looped one, its parameter- and depth-matched plain
    references (reusing an existing variant with the same resolved config)."""
    variants = [Variant(v.name, dict(v.values)) for v in section.variants]
    if not section.baselines:
        return variants
    by_canonical = {}
    for v in variants:
        key = _canonical({**section.base, **v.values})
        if key is not None:
            by_canonical.setdefault(key, v)
    names = {v.name for v in variants}
    for v in list(variants):
        full = {**section.base, **v.values}
        if not _looped(full) or _canonical(full) is None:
            continue
        for kind, n_layer in (("param", full.get("n_layer", all_keys()["n_layer"][1])),
                              ("depth", _effective_depth(full))):
            ref_values = _plain_reference(full, n_layer)
            key = _canonical(ref_values)
            ref = by_canonical.get(key)
            if ref is None:
                # Only the keys that differ from the section base are the baseline's overrides.
                overrides = {k: val for k, val in ref_values.items()
                             if k not in section.base or section.base[k] != val}
                for k in section.base:
                    if k not in ref_values:
                        overrides[k] = _plain_default(k)
                name = f"plain_L{n_layer}"
                while name in names:
                    name += "_ref"
                ref = Variant(name, overrides, role="baseline")
                names.add(name)
                variants.append(ref)
                by_canonical[key] = ref
            v.references[kind] = ref.name
            if v.name not in ref.baseline_for:
                ref.baseline_for.append(v.name)
    return variants


def _plain_default(key: str):
    """The default of a looping key (used when the section base itself turns looping on)."""
    return getattr(GPTConfig(), key) if key != "eval_loops" else []


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


def _flops_per_iter(cfg: TrainConfig, model_overrides: dict) -> float:
    """Training FLOPs of one iteration at the mean iteration count, as train.py counts them."""
    kwargs = dict(model_overrides)
    kwargs.setdefault("vocab_size", _data_vocab_size(cfg))
    config = GPTConfig(block_size=cfg.block_size, **kwargs)
    # On the meta device no memory is allocated, so sizing a large model costs nothing.
    with torch.device("meta"):
        model = GPT(config)
    # Every loop_sampling mode has mean max_loops (blockloop.looping.sample_num_loops).
    tokens = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    return model.flops_per_token(config.max_loops) * tokens


def _spec_hash(values: dict, evaluation: dict) -> str:
    """Identity of a run's result: what it trains and how it is evaluated (not where it lives)."""
    relevant = {k: v for k, v in values.items() if k not in ("out_dir", "threads", "progress")}
    blob = json.dumps({"values": relevant, "evaluation": evaluation}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def plan_experiment(exp: Experiment, out_dir: Path, threads: int = 1) -> tuple[list, dict]:
    """All runs of the experiment, and a JSON-able description of the plan for the report."""
    runs, sections_info = [], []
    runs_root = out_dir / RUNS_DIR
    for section in exp.sections:
        variants = add_baselines(section)
        sec_info = {
            "name": section.name, "description": section.description,
            "budget": section.budget, "seeds": section.seeds, "evaluation": section.evaluation,
            "base": section.base, "variants": [],
        }
        for v in variants:
            full = {**section.base, **v.values}
            v_info = {
                "name": v.name, "role": v.role, "overrides": v.values,
                "references": v.references, "baseline_for": v.baseline_for,
                "looped": _looped(full), "error": None, "iters": None,
            }
            iters, fpi, error = None, None, None
            try:
                train_cfg, model_overrides = build_configs(
                    {**full, "max_iters": 1, "lr_decay_iters": 1})
                try:
                    fpi = _flops_per_iter(train_cfg, model_overrides)
                except ExperimentError:
                    if "flops" in section.budget:
                        raise
                if "iters" in section.budget:
                    iters = section.budget["iters"]
                else:
                    iters = max(1, round(section.budget["flops"] / fpi))
            except (ConfigError, ExperimentError, ValueError) as e:
                error = f"{type(e).__name__}: {e}"
            v_info.update(error=error, iters=iters, flops_per_iter=fpi)
            sec_info["variants"].append(v_info)
            for seed in section.seeds:
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
                    run_id=run_id, section=section.name, variant=v.name, seed=seed,
                    role=v.role, run_dir=run_dir, values=values,
                    evaluation=section.evaluation, iters=iters, flops_per_iter=fpi,
                    spec_hash=_spec_hash(values, section.evaluation), error=error,
                ))
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


# ----------------------------------------------------------------------------------------------
# The run's own process: train, then evaluate


def _atomic_write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _finite(x):
    """JSON has no NaN/inf; a diverged loss is stored as None rather than breaking the file."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def _evaluate(model, batches, ctx, device, **kwargs) -> dict:
    return evaluate(model, batches, device=device, ctx=ctx, **kwargs).to_dict()


def post_evaluate(cfg: TrainConfig, evaluation: dict, log=print) -> dict:
    """What the report needs beyond metrics.jsonl, measured on the final model (last.pt)."""
    device = resolve_device(cfg.device)
    ctx = autocast_context(device, resolve_dtype(cfg.dtype, device))
    ckpt = load_checkpoint(Path(cfg.out_dir) / LAST_CKPT, map_location=device)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    data = TrainingData(cfg)
    val = data.eval_batches("val")
    looped = model.loop_plan is not None
    trained = model.config.max_loops
    out = {
        "vocab_size": data.vocab_size,
        "n_params": model.get_num_params(),
        "effective_depth": model.effective_depth(),
        "flops_per_token": model.flops_per_token(),
        "looped": looped,
        "max_loops": trained,
    }
    if looped:
        counts = sorted(set(evaluation["test_loops"]) | set(range(1, 2 * trained + 1)))
        out["loop_scaling"] = [
            {"loops": n, **_evaluate(model, val, ctx, device, num_loops=n, loop_exit=False)}
            for n in counts
        ]
        out["exit_default"] = {
            "threshold": model.config.automatic_loop_exit_threshold,
            **_evaluate(model, val, ctx, device, loop_exit=True),
        }
        cap = evaluation["exit_max_loops_factor"] * trained
        out["exit_sweep"] = [
            {"threshold": th, "max_loops": cap,
             **_evaluate(model, val, ctx, device, num_loops=cap, loop_exit=True, exit_threshold=th)}
            for th in sorted(evaluation["exit_thresholds"], reverse=True)
        ]
    if data.task is not None:
        task = data.task
        x, y = data.heldout
        out["floors"] = baseline_floors(task, x, y)
        trained_hops = task.hops
        hops = evaluation["hops"] or list(range(1, 2 * trained_hops + 1))
        loop_counts = [trained, 2 * trained] if looped else [None]
        trained_answers = task.answers(x, trained_hops)
        rows = []
        for p in hops:
            y_p = task.targets(x, p)
            defined = y_p[:, task.answer_position] != -1
            if not bool(defined.any()):
                continue  # no held-out example has a defined chain that long
            floors = {k: v for k, v in baseline_floors(task, x, y_p).items()
                      if not k.startswith("hop_")}
            # What a model that perfectly answers the trained hop count scores when asked for p
            # hops: the two answers often coincide, and this separates "solves p hops" from
            # "answers the trained question whatever is asked".
            same = (trained_answers[defined] == y_p[defined, task.answer_position])
            batches = list(zip(x.split(cfg.batch_size), y_p.split(cfg.batch_size)))
            for n in loop_counts:
                kwargs = {} if n is None else {"num_loops": n, "loop_exit": False}
                res = _evaluate(model, batches, ctx, device, **kwargs)
                rows.append({"hops": p, "loops": n or trained, "accuracy": res["accuracy"],
                             "floors": floors,
                             "trained_answer_accuracy": same.double().mean().item()})
        out["trained_hops"] = trained_hops
        out["hops"] = rows
    elif evaluation["samples"] > 0:
        tokenizer = tokenizer_from_meta(data.meta)
        try:
            start = tokenizer.encode("\n")
        except ValueError:
            start = [0]  # a character vocabulary without a newline
        gen = torch.Generator(device=device).manual_seed(SAMPLE_SEED)
        samples = []
        for _ in range(evaluation["samples"]):
            idx = torch.tensor([start], dtype=torch.long, device=device)
            with torch.no_grad(), ctx:
                ids, _ = generate(model, idx, evaluation["sample_tokens"],
                                  temperature=evaluation["sample_temperature"], generator=gen)
            samples.append(tokenizer.decode(ids[0, len(start):].tolist()))
        out["samples"] = samples
    return out


def _metrics_summary(path: Path) -> dict:
    """Best/final accuracy and the eval count from a run's metrics.jsonl."""
    evals = [rec for rec in read_jsonl(path) if rec.get("kind") == "eval"]
    out = {}
    acc = [r["val_accuracy"] for r in evals if "val_accuracy" in r]
    if acc:
        out["final_val_accuracy"] = acc[-1]
        out["best_val_accuracy"] = max(acc)
    return out


def run_child(spec_path: str) -> int:
    """Entry point of a run's process: train, evaluate, write result.json. Returns an exit code:
    0 done, 1 failed (the error is in result.json), 130 interrupted (no result: rerun it)."""
    spec = json.loads(Path(spec_path).read_text())
    run_dir = Path(spec["values"]["out_dir"])
    result_path = run_dir / RUN_RESULT_FILE
    t0 = time.time()
    try:
        cfg, model_overrides = build_configs(spec["values"])
        print(f"run {spec['run_id']}: {cfg.max_iters} iterations", flush=True)
        res = train(cfg, model_overrides, log=lambda m: print(m, flush=True))
        if res.stopped_by is not None:
            print(f"interrupted by {res.stopped_by}; no result written", flush=True)
            return 130
        t_eval = time.time()
        post = post_evaluate(cfg, spec["evaluation"])
        result = {
            "status": "ok",
            "iter_num": res.iter_num,
            "best_val_loss": _finite(res.best_val_loss),
            "final_val_loss": _finite(res.final_val_loss),
            "tokens_per_sec": res.tokens_per_sec,
            "wall_time_s": res.wall_time_s,
            "train_flops": res.train_flops,
            "posteval_time_s": time.time() - t_eval,
            **_metrics_summary(Path(res.metrics_path)),
            **post,
        }
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # every failure becomes a recorded result; the traceback goes to the log
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    result.update(run_id=spec["run_id"], spec_hash=spec["spec_hash"],
                  process_time_s=time.time() - t0)
    _atomic_write_json(result_path, result)
    return 0 if result["status"] == "ok" else 1


# The child is started with `python -c` rather than `-m blockloop.experiment` so that no hidden
# command-line mode is needed; `_child_env` puts this package's directory on PYTHONPATH so it
# resolves even when blockloop is not installed.
_CHILD_BOOT = "import sys; from blockloop.experiment import run_child; sys.exit(run_child(sys.argv[1]))"


# ----------------------------------------------------------------------------------------------
# The parent: scheduling, progress, results


def load_results(out_dir: Path) -> dict:
    """run_id -> its latest record in results.jsonl (a line cut short by a kill is ignored)."""
    records = {}
    for rec in read_jsonl(Path(out_dir) / RESULTS_FILE):
        if isinstance(rec, dict) and "run_id" in rec:
            records[rec["run_id"]] = rec
    return records


def _append_result(out_dir: Path, record: dict) -> None:
    path = out_dir / RESULTS_FILE
    line = json.dumps(record, default=_json_default) + "\n"
    # A runner killed mid-write leaves a line without its newline; start on a fresh line so the
    # new record is not glued to the broken one.
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class _Active:
    plan: RunPlan
    index: int  # i of "run i of n"
    proc: subprocess.Popen
    log_file: object
    started: float
    metrics_offset: int = 0
    iteration: int = 0
    loss: float | None = None
    val_loss: float | None = None

    def poll_metrics(self) -> None:
        path = self.plan.run_dir / "metrics.jsonl"
        try:
            with open(path) as f:
                f.seek(self.metrics_offset)
                chunk = f.read()
        except OSError:
            return
        # Only whole lines are consumed; a line being written is read next time.
        end = chunk.rfind("\n") + 1
        self.metrics_offset += len(chunk[:end].encode())
        for line in chunk[:end].splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.iteration = max(self.iteration, rec.get("iter", 0))
            if rec.get("kind") == "train":
                self.loss = rec.get("loss")
            elif rec.get("kind") == "eval":
                self.val_loss = rec.get("val_loss")

    def fraction(self) -> float:
        return min(1.0, self.iteration / max(self.plan.iters or 1, 1))


class _Eta:
    """Remaining wall time from the work left, at the speed runs have shown so far.

    Speed is seconds per unit of estimated cost (training FLOPs), per section because tiny
    synthetic-task models and language models spend very different time per FLOP.
    """

    def __init__(self, jobs: int):
        self.jobs = jobs
        self.done = {}  # section -> [seconds, cost]

    def finished(self, plan: RunPlan, seconds: float) -> None:
        s = self.done.setdefault(plan.section, [0.0, 0.0])
        s[0] += seconds
        s[1] += plan.cost()

    def estimate(self, pending, active, now: float) -> float | None:
        rates = {sec: s[0] / s[1] for sec, s in self.done.items() if s[1] > 0}
        for a in active:
            frac = a.fraction()
            if a.plan.section not in rates and frac > 0.05:
                rates[a.plan.section] = (now - a.started) / (frac * a.plan.cost())
        if not rates:
            return None
        fallback = sum(rates.values()) / len(rates)
        left = 0.0
        for p in pending:
            left += p.cost() * rates.get(p.section, fallback)
        for a in active:
            rate = rates.get(a.plan.section, fallback)
            left += max(0.0, (1 - a.fraction()) * a.plan.cost() * rate)
        return left / self.jobs


def _child_env(threads: int) -> dict:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # Keep BLAS/OpenMP pools to the run's share of the machine (torch.set_num_threads in the
    # child covers torch's own pool; these cover libraries that read the environment).
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("MKL_NUM_THREADS", str(threads))
    return env


def _start(plan: RunPlan, index: int, threads: int) -> _Active:
    if plan.run_dir.exists():
        # An unfinished run restarts from scratch; its directory is ours by construction.
        shutil.rmtree(plan.run_dir)
    plan.run_dir.mkdir(parents=True)
    spec = {"run_id": plan.run_id, "values": plan.values, "evaluation": plan.evaluation,
            "spec_hash": plan.spec_hash}
    spec_path = plan.run_dir / RUN_SPEC_FILE
    _atomic_write_json(spec_path, spec)
    log_file = open(plan.run_dir / RUN_LOG_FILE, "w")
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD_BOOT, str(spec_path)],
        stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=_child_env(threads),
    )
    return _Active(plan=plan, index=index, proc=proc, log_file=log_file, started=time.time())


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _collect(a: _Active, experiment_name: str) -> dict:
    """The results.jsonl record of a finished run process."""
    plan = a.plan
    a.log_file.close()
    base = {"run_id": plan.run_id, "experiment": experiment_name, "section": plan.section,
            "variant": plan.variant, "seed": plan.seed, "role": plan.role,
            "spec_hash": plan.spec_hash, "iters": plan.iters, "run_dir": str(plan.run_dir),
            "elapsed_s": time.time() - a.started}
    result_path = plan.run_dir / RUN_RESULT_FILE
    result = None
    if result_path.exists():
        try:
            result = json.loads(result_path.read_text())
        except json.JSONDecodeError:
            result = None
    if result is None or result.get("spec_hash") != plan.spec_hash:
        tail = _log_tail(plan.run_dir / RUN_LOG_FILE)
        return {**base, "status": "failed",
                "error": f"the run process exited with code {a.proc.returncode} without a "
                         f"result; last lines of its log:\n{tail}"}
    return {**result, **base}


def run_experiment(
    exp: Experiment,
    out_dir: Path,
    jobs: int,
    force: bool = False,
    status_interval: float = 15.0,
    log=print,
) -> dict:
    """Plan, run what is missing, write results.jsonl and the report. Returns a summary dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cpus = _cpu_count()
    threads = max(1, cpus // jobs)
    runs, info = plan_experiment(exp, out_dir, threads)
    previous = {} if force else load_results(out_dir)
    todo, skipped, failed_at_plan = [], 0, []
    for plan in runs:
        rec = previous.get(plan.run_id)
        if rec and rec.get("status") == "ok" and rec.get("spec_hash") == plan.spec_hash:
            skipped += 1
        elif plan.error is not None:
            failed_at_plan.append(plan)
        else:
            adopted = _adopt_finished(plan, exp.name)
            if adopted is not None:
                # The run finished but the experiment was stopped before recording it.
                _append_result(out_dir, adopted)
                skipped += 1
            else:
                todo.append(plan)
    started_at = time.time()
    info.update(
        out_dir=str(out_dir), jobs=jobs, threads_per_run=threads, cpus=cpus,
        started_at=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started_at)),
        runs_total=len(runs), runs_skipped=skipped, runs_to_do=len(todo) + len(failed_at_plan),
        finished=False,
    )
    _atomic_write_json(out_dir / PLAN_FILE, info)
    n = len(todo) + len(failed_at_plan)
    log(f"experiment '{exp.name}': {len(runs)} runs, {skipped} already done, {n} to run; "
        f"{jobs} at a time x {threads} thread(s); output in {out_dir}")
    index = 0
    for plan in failed_at_plan:
        index += 1
        log(f"[{index}/{n}] FAILED {plan.run_id}: {plan.error}")
        _append_result(out_dir, {
            "run_id": plan.run_id, "experiment": exp.name, "section": plan.section,
            "variant": plan.variant, "seed": plan.seed, "role": plan.role,
            "spec_hash": plan.spec_hash, "status": "failed", "error": plan.error,
        })
    # Longest first: the last runs to start are short, so the jobs finish close together.
    todo.sort(key=lambda p: -p.cost())
    active: list[_Active] = []
    eta = _Eta(jobs)
    n_ok = n_failed = 0
    n_failed += len(failed_at_plan)
    last_status = time.time()
    interrupted = False
    previous_sigterm = _sigterm_as_interrupt()
    try:
        while todo or active:
            while todo and len(active) < jobs:
                plan = todo.pop(0)
                index += 1
                log(f"[{index}/{n}] start {plan.run_id} ({plan.iters} iterations)")
                active.append(_start(plan, index, threads))
            time.sleep(0.2)
            now = time.time()
            for a in list(active):
                a.poll_metrics()
                if a.proc.poll() is None:
                    continue
                active.remove(a)
                record = _collect(a, exp.name)
                _append_result(out_dir, record)
                eta.finished(a.plan, record["elapsed_s"])
                if record["status"] == "ok":
                    n_ok += 1
                    metric = (f"val accuracy {record['final_val_accuracy']:.3f}"
                              if "final_val_accuracy" in record else
                              f"best val loss {record.get('best_val_loss') or float('nan'):.4f}")
                    log(f"[{a.index}/{n}] done {a.plan.run_id} in {_fmt_time(record['elapsed_s'])}: "
                        f"{metric}")
                else:
                    n_failed += 1
                    first_line = record["error"].splitlines()[0]
                    log(f"[{a.index}/{n}] FAILED {a.plan.run_id}: {first_line} "
                        f"(log: {a.plan.run_dir / RUN_LOG_FILE})")
            if active and now - last_status >= status_interval:
                last_status = now
                left = eta.estimate(todo, active, now)
                parts = [
                    f"[{a.index}/{n}] {a.plan.run_id} it {a.iteration}/{a.plan.iters}"
                    + (f" loss {a.loss:.3f}" if a.loss is not None else "")
                    for a in active
                ]
                log(" | ".join(parts) + f" | {n_ok + n_failed}/{n} finished, elapsed "
                    f"{_fmt_time(now - started_at)}, ETA "
                    + (_fmt_time(left) if left is not None else "(measuring)"))
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping the running runs (finished runs are kept; run the same "
            "command again to continue)")
        for a in active:
            # A Ctrl-C in a terminal reaches the children too, a SIGTERM to the runner does not:
            # ask each to stop (training saves and exits on SIGINT), then end the ones that hang.
            if a.proc.poll() is None:
                a.proc.send_signal(signal.SIGINT)
            try:
                a.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                a.proc.terminate()
                a.proc.wait()
            a.log_file.close()
    finally:
        _restore_sigterm(previous_sigterm)
    wall = time.time() - started_at
    info.update(wall_time_s=wall, finished=not interrupted,
                runs_ok_now=n_ok, runs_failed_now=n_failed)
    _atomic_write_json(out_dir / PLAN_FILE, info)
    report_path = None
    if not interrupted:
        report_path = _write_report(out_dir)
        log(f"report: {report_path}")
    log(f"{n_ok} runs done, {n_failed} failed, {skipped} skipped (done before) in "
        f"{_fmt_time(wall)}")
    return {"ok": n_ok, "failed": n_failed, "skipped": skipped, "interrupted": interrupted,
            "wall_time_s": wall, "report": report_path}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _sigterm_as_interrupt():
    """Make SIGTERM stop the runner like Ctrl-C does (children stopped, results kept)."""
    try:
        return signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:
        return None  # not the main thread: signals cannot be handled here


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _adopt_finished(plan: RunPlan, experiment_name: str) -> dict | None:
    """A run whose process finished (result.json present, same config) but was never recorded."""
    path = plan.run_dir / RUN_RESULT_FILE
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if result.get("status") != "ok" or result.get("spec_hash") != plan.spec_hash:
        return None
    return {**result, "run_id": plan.run_id, "experiment": experiment_name,
            "section": plan.section, "variant": plan.variant, "seed": plan.seed,
            "role": plan.role, "iters": plan.iters, "run_dir": str(plan.run_dir)}


def _write_report(out_dir: Path) -> Path:
    # Imported on use: blockloop.report imports this module (file names, load_results).
    from blockloop.report import write_report

    return write_report(out_dir)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockloop experiment",
        description="Train every variant x seed of an experiment file under the same budget, "
        "data order and evaluation batches, then write results.jsonl and a report "
        "(Markdown + PNG). Runs already recorded with the same config are skipped, so an "
        "interrupted experiment continues where it stopped.",
        epilog=_FORMAT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", metavar="CONFIG", help="experiment file, e.g. config/experiment_default.py")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: experiments/<name>)")
    parser.add_argument(
        "--jobs", type=int, default=None, metavar="N",
        help=f"runs side by side, each with (CPUs / N) threads (default: the number of CPUs, "
        f"here {_cpu_count()}: single-thread runs in parallel use a small CPU best)",
    )
    parser.add_argument("--force", action="store_true", help="rerun every run, even recorded ones")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite the report from the results already recorded")
    return parser


_FORMAT_HELP = """experiment file format (Python literals, parsed, never executed):
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
  sections = [{"name": "a", ...}, ...]   several comparisons in one file; top-level keys
                                         are defaults for every section
  LOOP = {"max_loops": 3}                upper-case names are constants: {"name": "a", **LOOP}
The runner sets out_dir, seed, max_iters and lr_decay_iters for every run.
Exit status: 0 all runs ok, 1 some run failed (see the report), 2 bad file/options,
130 interrupted."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        exp = read_experiment_file(args.config)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.out) if args.out else Path("experiments") / safe_name(exp.name)
    if args.report_only:
        if not (out_dir / PLAN_FILE).exists():
            print(f"error: {out_dir / PLAN_FILE} not found; run the experiment first", file=sys.stderr)
            return 2
        print(f"report: {_write_report(out_dir)}")
        return 0
    jobs = args.jobs if args.jobs is not None else _cpu_count()
    if jobs < 1:
        print("error: --jobs must be >= 1", file=sys.stderr)
        return 2
    try:
        summary = run_experiment(exp, out_dir, jobs, force=args.force)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary["interrupted"]:
        return 130
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
