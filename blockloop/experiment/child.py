"""The run's own process: train one run, evaluate the final model, write `result.json`.

The runner starts every run as its own process (`run_logged_child`), so a crash, a leak or a
thread setting cannot touch the others; the process is forked from a server that imported torch
and this module once, which saves the seconds of a fresh interpreter per run. `run_child`
trains with `blockloop.train`, then `post_evaluate` measures on the final model (last.pt) what the report needs beyond
`metrics.jsonl`, with the shared pieces: `checkpoint.load_model`, `runtime`'s device, dtype and
autocast, and `evaluation`'s loss/accuracy, test-time loop scaling and automatic-exit sweep.
Test-time iteration counts come from `looping`, so a model that can run only one iteration
("concat" injection built with `max_loops=1`) is evaluated at that one count.

For synthetic tasks it adds the trivial-strategy floors and the accuracy against the number of
hops asked; for token data, generated samples. Every result records the code that made it
(`records.code_identity()`, key `code`), so the runner can tell results of other code apart.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from blockloop.checkpoint import LAST_CKPT, load_model
from blockloop.config import TrainConfig, build_configs
from blockloop.evaluation import evaluate, exit_sweep, loop_scaling
from blockloop.experiment.files import RUN_RESULT_FILE
from blockloop.looping import (
    effective_depth,
    is_looped,
    max_runnable_loops,
    scaling_loop_counts,
    trained_counts,
)
from blockloop.records import atomic_write_json, code_identity, finite_or_none, read_jsonl
from blockloop.runtime import autocast_context, resolve_device, resolve_dtype
from blockloop.sampling import generate
from blockloop.tasks import baseline_floors
from blockloop.tokenizers import tokenizer_from_meta
from blockloop.train import TrainingData, train

# Identifies the sample-generation random stream, so samples are reproducible per run.
SAMPLE_SEED = 1234


def run_child(spec_path: str) -> int:
    """Entry point of a run's process: train, evaluate, write result.json. Returns an exit code:
    0 done, 1 failed (the error is in result.json), 130 interrupted (no result: rerun it)."""
    spec = json.loads(Path(spec_path).read_text())
    run_dir = Path(spec["values"]["out_dir"])
    t0 = time.time()
    try:
        result = _train_and_evaluate(spec)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # every failure becomes a recorded result; the traceback goes to the log
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    if result is None:
        return 130
    result.update(run_id=spec["run_id"], spec_hash=spec["spec_hash"], code=code_identity(),
                  process_time_s=time.time() - t0)
    atomic_write_json(run_dir / RUN_RESULT_FILE, result, indent=1)
    return 0 if result["status"] == "ok" else 1


def run_logged_child(spec_path: str, log_path: str, cwd: str, env: dict) -> None:
    """Entry point of a run's process as the runner starts it (forked from a server that has
    already imported this module): the runner's working directory and environment `env` at
    the run's start, stdout and stderr into the run's log `log_path`, then `run_child`; exits
    with its code."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.exit(run_child(spec_path))


def _train_and_evaluate(spec: dict) -> dict | None:
    """The result of a successful run, or None if training was interrupted."""
    cfg, model_overrides = build_configs(spec["values"])
    print(f"run {spec['run_id']}: {cfg.max_iters} iterations", flush=True)
    res = train(cfg, model_overrides, log=lambda m: print(m, flush=True))
    if res.stopped_by is not None:
        print(f"interrupted by {res.stopped_by}; no result written", flush=True)
        return None
    t_eval = time.time()
    post = post_evaluate(cfg, spec["evaluation"])
    return {
        "status": "ok",
        "iter_num": res.iter_num,
        "best_val_loss": finite_or_none(res.best_val_loss),
        "final_val_loss": finite_or_none(res.final_val_loss),
        "tokens_per_sec": res.tokens_per_sec,
        "wall_time_s": res.wall_time_s,
        "train_flops": res.train_flops,
        "posteval_time_s": time.time() - t_eval,
        **_metrics_summary(Path(res.metrics_path)),
        **post,
    }


def _metrics_summary(path: Path) -> dict:
    """Best/final accuracy and the eval count from a run's metrics.jsonl."""
    evals = [rec for rec in read_jsonl(path) if rec.get("kind") == "eval"]
    out = {}
    acc = [r["val_accuracy"] for r in evals if "val_accuracy" in r]
    if acc:
        out["final_val_accuracy"] = acc[-1]
        out["best_val_accuracy"] = max(acc)
    return out


def post_evaluate(cfg: TrainConfig, evaluation: dict, log=print) -> dict:
    """What the report needs beyond metrics.jsonl, measured on the final model (last.pt).

    Looped models: `loop_scaling` (rows of `evaluation.loop_scaling`), `exit_default` (automatic
    exit at the model's own threshold) and `exit_sweep` (rows of `evaluation.exit_sweep`).
    Tasks: `floors`, `trained_hops` and `hops` rows; token data: `samples`.
    """
    device = resolve_device(cfg.device)
    ctx = autocast_context(device, resolve_dtype(cfg.dtype, device))
    model, payload = load_model(Path(cfg.out_dir) / LAST_CKPT, device)
    config = model.config
    data = TrainingData(cfg)
    data.check_trained_on(payload.get("meta") or {})
    out = {
        "vocab_size": data.vocab_size,
        "n_params": model.get_num_params(),
        "effective_depth": effective_depth(config),
        "flops_per_token": model.flops_per_token(),
        "looped": is_looped(config),
        "max_loops": config.max_loops,
    }
    if is_looped(config):
        out.update(_loop_evaluation(model, data.eval_batches("val"), evaluation,
                                    device=device, ctx=ctx))
    if data.task is not None:
        out.update(_hop_evaluation(model, data, evaluation, cfg.batch_size, device=device, ctx=ctx))
    elif evaluation["samples"] > 0:
        out["samples"] = _samples(model, payload.get("meta") or data.meta, evaluation, device, ctx)
    return out


def _loop_evaluation(model, batches, evaluation: dict, **kwargs) -> dict:
    """Test-time loop scaling, exit at the model's own threshold, and the exit sweep capped at
    `exit_max_loops_factor` times the trained count (or what the model can run)."""
    config = model.config
    counts = scaling_loop_counts(config, extra=evaluation["test_loops"])
    trained = max(trained_counts(config))
    cap = min(evaluation["exit_max_loops_factor"] * trained, max_runnable_loops(config))
    return {
        "loop_scaling": loop_scaling(model, batches, counts, **kwargs),
        "exit_default": {
            "threshold": config.automatic_loop_exit_threshold,
            **evaluate(model, batches, loop_exit=True, **kwargs).to_dict(),
        },
        "exit_sweep": exit_sweep(model, batches, evaluation["exit_thresholds"], cap,
                                 granularity=evaluation.get("exit_granularity", "token"),
                                 **kwargs),
    }


def _hop_evaluation(model, data: TrainingData, evaluation: dict, batch_size: int,
                    **kwargs) -> dict:
    """Accuracy on the held-out inputs when asked for other hop counts than the trained one, at
    the trained iteration count and (looped models) twice that, with the floors beside it."""
    task = data.task
    x, y = data.heldout
    config = model.config
    trained, trained_hops = config.max_loops, task.hops
    hops = evaluation["hops"] or list(range(1, 2 * trained_hops + 1))
    counts = [n for n in scaling_loop_counts(config) if n in (trained, 2 * trained)] or [None]
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
        same = trained_answers[defined] == y_p[defined, task.answer_position]
        batches = list(zip(x.split(batch_size), y_p.split(batch_size)))
        for n in counts:
            loops = {} if n is None else {"num_loops": n, "loop_exit": False}
            res = evaluate(model, batches, **loops, **kwargs)
            rows.append({"hops": p, "num_loops": n or trained, "accuracy": res.accuracy,
                         "floors": floors,
                         "trained_answer_accuracy": same.double().mean().item()})
    return {"floors": baseline_floors(task, x, y), "trained_hops": trained_hops, "hops": rows}


def _samples(model, meta: dict, evaluation: dict, device: str, ctx) -> list:
    """Texts generated from a newline, reproducible per run (SAMPLE_SEED), decoded with the
    tokenizer in `meta` (the checkpoint's, which carries it)."""
    tokenizer = tokenizer_from_meta(meta)
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
                              temperature=evaluation["sample_temperature"], generator=gen,
                              vocab_limit=tokenizer.vocab_size)
        samples.append(tokenizer.decode(ids[0, len(start):].tolist()))
    return samples
